use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    vertical_vector(q_block = "128")
}

fn main() {}
