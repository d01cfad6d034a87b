//! checkout's entry point: the shared Keel command line (`serve`, `migrate`, `check-config`);
//! everything specific to checkout is in the library.

fn main() {
    keel_service::cli::main::<checkout::Checkout>()
}
