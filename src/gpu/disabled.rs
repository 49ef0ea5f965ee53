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

    pub fn merge_rows(
        &self,
        _x: &mut [f32],
        _cols: usize,
        _dtype: Dtype,
        _steps: &[super::MergeStep],
    ) -> Result<()> {
        match *self {}
    }
}
