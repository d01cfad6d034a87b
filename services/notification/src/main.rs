//! notification's entry point: the shared Keel command line (`serve`, `migrate`,
//! `check-config`); everything specific to notification is in the library.

fn main() {
    keel_service::cli::main::<notification::Notification>()
}
