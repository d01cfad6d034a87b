//! skeleton's entry point: the shared Keel command line (`serve`, `migrate`, `check-config`,
//! exit codes 0 / 64 / 69 / 78 / 1); everything specific to skeleton is in the library.

fn main() {
    keel_service::cli::main::<skeleton::SkeletonService>()
}
