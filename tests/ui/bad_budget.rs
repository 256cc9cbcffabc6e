use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    vertical_slash(vertical = 1000)
}

fn main() {}
