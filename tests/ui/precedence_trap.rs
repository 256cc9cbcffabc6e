use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    causal & k % 64 == 0
}

fn main() {}
