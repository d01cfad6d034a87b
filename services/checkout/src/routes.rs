//! A router that knows its own routes.
//!
//! axum cannot list the routes of a `Router`, so a hand-kept list beside it (what
//! `openapi.yaml` is checked against) drifts the day someone adds a route and forgets the
//! list. [`Routes`] closes that gap: each of its methods adds the route to the axum router
//! *and* records its method and path template in the same call, so the list is the router's
//! by construction. checkout builds its whole API through it, and `App::routes` hands the list
//! to `tests/openapi.rs`, which requires `openapi.yaml` to document exactly these routes.

use std::fmt;

use axum::Router;
use axum::handler::Handler;
use axum::routing::{self, MethodRouter};
use http::Method;

/// One route: a method and a path template as axum matches it (`/v1/orders/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
}

impl Route {
    pub fn new(method: Method, path: &'static str) -> Self {
        Self { method, path }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// An axum [`Router`] and the list of the routes added to it (module docs).
#[derive(Debug)]
#[must_use]
pub struct Routes<S = ()> {
    router: Router<S>,
    list: Vec<Route>,
}

impl<S> Default for Routes<S>
where
    S: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Routes<S>
where
    S: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self {
            router: Router::new(),
            list: Vec::new(),
        }
    }

    /// `GET path` answered by `handler`.
    pub fn get<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(Method::GET, path, routing::get(handler))
    }

    /// `POST path` answered by `handler`.
    pub fn post<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(Method::POST, path, routing::post(handler))
    }

    // Private, and fed only by the methods above: the method recorded is the one the
    // `MethodRouter` was built for, never a second argument that could disagree with it.
    fn add(mut self, method: Method, path: &'static str, on: MethodRouter<S>) -> Self {
        // axum merges method routers of one path (GET and POST on the same path are fine).
        self.router = self.router.route(path, on);
        self.list.push(Route::new(method, path));
        self
    }

    /// Both sets of routes (axum panics on a route present in both, as `Router::merge` does).
    pub fn merge(mut self, other: Routes<S>) -> Self {
        self.router = self.router.merge(other.router);
        self.list.extend(other.list);
        self
    }

    /// Provides the handlers' state, as `Router::with_state`.
    pub fn with_state<S2>(self, state: S) -> Routes<S2>
    where
        S2: Clone + Send + Sync + 'static,
    {
        Routes {
            router: self.router.with_state(state),
            list: self.list,
        }
    }

    /// The routes added so far.
    pub fn list(&self) -> &[Route] {
        &self.list
    }

    /// The router to serve, and its routes.
    pub fn into_parts(self) -> (Router<S>, Vec<Route>) {
        (self.router, self.list)
    }
}
