//! psp-sim's entry point: the shared Keel command line; everything else is in the library.

fn main() {
    keel_service::cli::main::<psp_sim::PspSim>()
}
