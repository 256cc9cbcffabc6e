use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    causal & (k % q == 0)
}

fn main() {}
