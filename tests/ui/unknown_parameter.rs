use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    vertical_vector(qblock = 64)
}

fn main() {}
