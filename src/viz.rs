//! Pictures and arrays of an index: a PNG block map a person can read, and the dense mask as
//! a `.npy` file for small sequences.

use std::io::Write;
use std::path::Path;

use weft_patterns::{SparseIndex, FULL};

/// Colours of the block map.
pub mod colour {
    pub const EMPTY: [u8; 3] = [255, 255, 255];
    pub const FULL: [u8; 3] = [46, 94, 170];
    pub const PARTIAL_KEPT: [u8; 3] = [120, 165, 225];
    pub const PARTIAL_SKIPPED: [u8; 3] = [228, 236, 246];
    pub const COLUMN: [u8; 3] = [214, 55, 46];
    pub const GRID: [u8; 3] = [200, 200, 200];
}

/// What the picture's legend says, one line per colour.
pub const LEGEND: &str = "dark blue: full block | light blue: kept pair of a partial block | pale: skipped pair of a partial block | red: column pick | white: not computed";

/// Renders head `h` of `ix` as an RGB image of at most `max_px` pixels a side: rows are query
/// positions top to bottom, columns key positions left to right (index order).
pub fn block_map(ix: &SparseIndex, h: usize, max_px: usize) -> (usize, usize, Vec<u8>) {
    let (nq, nk) = (ix.nq, ix.nk);
    let hgt = nq.min(max_px).max(1);
    let wid = nk.min(max_px).max(1);
    let mut rgb = vec![255u8; hgt * wid * 3];
    let q_of = |y: usize| y * nq / hgt;
    let k_of = |x: usize| x * nk / wid;
    for y in 0..hgt {
        let (q0, q1) = (q_of(y), q_of(y + 1).max(q_of(y) + 1));
        let qc = (q0 + q1 - 1) / 2;
        let qb = qc / ix.block_m;
        let blocks: Vec<(usize, u16)> = ix.blocks(h, qb).collect();
        let cols: Vec<(usize, u16)> = ix.columns(h, qb).collect();
        for x in 0..wid {
            let (k0, k1) = (k_of(x), k_of(x + 1).max(k_of(x) + 1));
            let kc = (k0 + k1 - 1) / 2;
            let kb = kc / ix.block_n;
            let column = cols.iter().any(|&(c, m)| c >= k0 && c < k1 && (m == FULL || ix.contains(h, qc, c)));
            let c = if column {
                colour::COLUMN
            } else {
                match blocks.iter().find(|(b, _)| *b == kb) {
                    Some((_, FULL)) => colour::FULL,
                    Some(_) if ix.contains(h, qc, kc) => colour::PARTIAL_KEPT,
                    Some(_) => colour::PARTIAL_SKIPPED,
                    None => {
                        // Faint block boundaries when blocks are at least 4 pixels wide.
                        let bw = ix.block_n * wid / nk.max(1);
                        let bh = ix.block_m * hgt / nq.max(1);
                        let edge =
                            (bw >= 4 && k0 % ix.block_n == 0 && k0 > 0) || (bh >= 4 && q0 % ix.block_m == 0 && q0 > 0);
                        if edge {
                            colour::GRID
                        } else {
                            colour::EMPTY
                        }
                    }
                }
            };
            let i = (y * wid + x) * 3;
            rgb[i..i + 3].copy_from_slice(&c);
        }
    }
    (wid, hgt, rgb)
}

/// Writes an RGB image as PNG.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(rgb).map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)
}

/// Writes a boolean `[rows, cols]` array in NumPy's `.npy` format (version 1.0, dtype `|b1`).
pub fn write_npy_bool(path: &Path, rows: usize, cols: usize, data: &[bool]) -> std::io::Result<()> {
    let mut header = format!("{{'descr': '|b1', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    let bytes: Vec<u8> = data.iter().map(|b| u8::from(*b)).collect();
    f.write_all(&bytes)?;
    f.flush()
}

/// The dense mask of head `h` in token coordinates, row-major `[nq, nk]`.
pub fn dense_mask(ix: &SparseIndex, h: usize) -> Vec<bool> {
    let mut m = vec![false; ix.nq * ix.nk];
    for qpos in 0..ix.nq {
        let t = ix.q_token(qpos);
        ix.for_each_key(h, qpos, |kpos| m[t * ix.nk + ix.k_token(kpos)] = true);
    }
    m
}
