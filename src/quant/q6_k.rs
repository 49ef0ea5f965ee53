//! Q6_K blocks (to be written: bit-exact port of llama.cpp's reference).

pub fn quantize(_x: &[f32], _y: &mut [u8]) {
    unimplemented!("Q6_K quantizer")
}

pub fn dequantize(_x: &[u8], _y: &mut [f32]) {
    unimplemented!("Q6_K dequantizer")
}
