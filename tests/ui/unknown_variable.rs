use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    (q >= key)
}

fn main() {}
