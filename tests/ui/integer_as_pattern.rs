use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    causal & q
}

fn main() {}
