use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    sink(1.5) | local(128)
}

fn main() {}
