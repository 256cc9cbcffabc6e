use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    causal & (k << 2 == 0)
}

fn main() {}
