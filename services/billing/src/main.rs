//! billing's entry point: the shared Keel command line (`serve`, `migrate`, `check-config`)
//! plus `rebuild-projections`; everything specific to billing is in the library.

fn main() {
    keel_service::cli::main::<billing::Billing>()
}
