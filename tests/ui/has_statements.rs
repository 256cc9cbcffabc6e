use weft::sparse_pattern;

#[sparse_pattern]
fn p() -> Pattern {
    let w = 128;
    window(w)
}

fn main() {}
