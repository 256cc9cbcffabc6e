//! `#[sparse_pattern]` mistakes are compile errors at the offending token (trybuild).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
