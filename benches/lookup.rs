//! Placeholder until the lookup benches land.
fn main() {}
