//! The GPU backend in a build without the `cuda` feature: same API, never available.

use super::{DoubleQuantRounding, Dtype, FourBitTable, GpuUnavailable};
use crate::quant::GgmlType;
use anyhow::Result;

/// A GPU handle; this build can't make one.
#[derive(Debug)]
pub enum Gpu {}

impl Gpu {
    pub(crate) fn probe() -> Result<Gpu, GpuUnavailable> {
        Err(GpuUnavailable::NotCompiled)
    }

    pub fn describe(&self) -> String {
        match *self {}
    }

    pub fn quantize(&self, _ty: GgmlType, _x: &[f32], _y: &mut [u8]) -> Result<()> {
        match *self {}
    }

    pub fn quantize_4bit(
        &self,
        _x: &[f32],
        _blocksize: usize,
        _table: &FourBitTable,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        match *self {}
    }

    pub fn double_quant(
        &self,
        _absmax: &[f32],
        _offset: f32,
        _code: &[f32; 256],
        _rounding: DoubleQuantRounding,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        match *self {}
    }

    pub fn widen(&self, _src: &[u8], _dtype: Dtype) -> Result<Vec<f32>> {
        match *self {}
    }

    #[allow(clippy::too_many_arguments)]
    pub fn lora_merge(
        &self,
        _w: &[f32],
        _a: &[f32],
        _b: &[f32],
        _rows: usize,
        _cols: usize,
        _rank: usize,
        _scale: f32,
        _layout: super::LoraLayout,
        _dtype: Dtype,
    ) -> Result<Vec<f32>> {
        match *self {}
    }

    pub fn dora_apply(
        &self,
        _v: &[f32],
        _magnitude: &[f32],
        _rows: usize,
        _cols: usize,
        _by_row: bool,
        _dtype: Dtype,
    ) -> Result<Vec<u8>> {
        match *self {}
    }
}
