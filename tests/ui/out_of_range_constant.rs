use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    causal & (k < 3000000000)
}

fn main() {}
