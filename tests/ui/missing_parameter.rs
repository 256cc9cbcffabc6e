use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    grid(phase = 3)
}

fn main() {}
