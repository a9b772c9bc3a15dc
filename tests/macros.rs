//! Goal: the macros accept correct handlers and reject misuse with a clear error at the offending span.
#[test]
fn macros_pass_and_fail() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
