//! A Gallery's rows on a GPU, searched there (`Gallery(..., device="cuda")`).
//!
//! The mirror holds the rows in the gallery's storage type (float32, float16, bfloat16, or
//! int8 codes with their per-row scales): the bytes the CPU search reads, decoded in the
//! kernels. It is built from the gallery on first search and rebuilt after the gallery
//! changes.

use super::device::Carver;
use super::driver::{with_stream, DeviceBuffer};
use super::search::{self, SearchBuffers, SearchShape, SearchTiling, Stored, MAX_K};
use crate::search::gallery::{Codes, Gallery, IdFilter};
use crate::search::{unit_queries, SearchResult};
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};
use std::sync::Mutex;

/// A gallery's rows in device memory.
pub struct Mirror {
    ordinal: usize,
    rows: DeviceBuffer,
    /// int8 rows' scales.
    scales: Option<DeviceBuffer>,
    stored: Stored,
    n: usize,
    d: usize,
    /// The last search's scratch (queries, results, workspace), kept for the next one:
    /// allocating device memory is a synchronous driver call.
    scratch: Option<DeviceBuffer>,
}

impl Mirror {
    /// Uploads `gallery`'s rows to device `ordinal`.
    pub fn new(gallery: &Gallery, ordinal: usize) -> Result<Mirror> {
        let (n, d) = (gallery.len(), gallery.dim());
        let stored = match gallery.codes() {
            Codes::F32(_) => Stored::F32,
            Codes::F16(_) => Stored::F16,
            Codes::BF16(_) => Stored::Bf16,
            Codes::I8(..) => Stored::I8,
        };
        let rows = DeviceBuffer::new(ordinal, n * d * stored.size())?;
        let scales = match gallery.codes() {
            Codes::I8(_, scales) => Some(DeviceBuffer::new(ordinal, scales.len() * 4)?),
            _ => None,
        };
        with_stream(ordinal, 0, |s| match gallery.codes() {
            Codes::F32(v) => s.upload(rows.ptr(), &v[..]),
            Codes::F16(v) | Codes::BF16(v) => s.upload(rows.ptr(), &v[..]),
            Codes::I8(v, scale) => {
                s.upload(rows.ptr(), &v[..])?;
                s.upload(scales.as_ref().expect("made above").ptr(), &scale[..])
            }
        })?;
        Ok(Mirror {
            ordinal,
            rows,
            scales,
            stored,
            n,
            d,
            scratch: None,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Device memory the rows (and int8 scales) take.
    pub fn nbytes(&self) -> usize {
        self.rows.bytes() + self.scales.as_ref().map_or(0, DeviceBuffer::bytes)
    }

    /// Top-`k` of `queries` as gallery row indices; -1 / -inf pad when `k` exceeds the rows
    /// (or the rows `allowed` lets through: a [`Gallery::row_mask`]). More than [`MAX_K`] per
    /// query (counting only rows that exist) is an error.
    pub fn search_rows(
        &mut self,
        queries: ArrayView2<f32>,
        k: usize,
        allowed: Option<&[u32]>,
    ) -> Result<SearchResult<f32>> {
        if k == 0 {
            return Err(Error::invalid("k", "must be >= 1"));
        }
        if self.n == 0 {
            return Err(Error::invalid("gallery", "is empty: add embeddings first"));
        }
        let qhat = unit_queries(queries, self.d, false)?;
        let q = qhat.nrows();
        let shape = SearchShape {
            n: self.n,
            d: self.d,
            q,
            k: k.min(self.n),
            stored: self.stored,
        };
        let tiling = SearchTiling::default();
        let found = q * shape.k;
        // One allocation per search (each is a synchronous driver call), carved up.
        let mut layout = Carver::new(0);
        let offsets = [
            layout.take(q * self.d, 4),
            layout.take(found, 4),
            layout.take(found, 8),
            layout.take(search::workspace_bytes(shape, tiling), 1),
            layout.take(allowed.map_or(0, <[u32]>::len), 4),
        ];
        if self
            .scratch
            .as_ref()
            .is_none_or(|b| b.bytes() < layout.bytes())
        {
            self.scratch = None; // free the small one first
            self.scratch = Some(DeviceBuffer::new(self.ordinal, layout.bytes())?);
        }
        let scratch = self.scratch.as_ref().expect("just made");
        let [queries_at, out_s_at, out_i_at, workspace_at, mask_at] =
            offsets.map(|o| scratch.ptr() + o);
        let mut host_s = vec![0f32; found];
        let mut host_i = vec![0i64; found];
        with_stream(self.ordinal, 0, |s| {
            let unit = qhat.as_slice().expect("unit queries are contiguous");
            s.upload(queries_at, unit)?;
            if let Some(mask) = allowed {
                s.upload(mask_at, mask)?;
            }
            let buffers = SearchBuffers {
                rows: self.rows.ptr(),
                scales: self.scales.as_ref().map_or(0, DeviceBuffer::ptr),
                queries: queries_at,
                workspace: workspace_at,
                out_s: out_s_at,
                out_i: out_i_at,
                allowed: if allowed.is_some() { mask_at } else { 0 },
            };
            search::search(s, shape, &buffers, tiling)?;
            // only (Q, k) comes back: the selection and the merge ran on the device
            s.download(&mut host_s, out_s_at)?;
            s.download(&mut host_i, out_i_at)
        })?;
        let (mut scores, rows) = search::padded(&host_s, &host_i, shape, k);
        // reported cosines stay in [-1, 1], as on the CPU; -inf padding stays
        for s in scores.iter_mut().filter(|s| s.is_finite()) {
            *s = s.clamp(-1.0, 1.0);
        }
        Ok(SearchResult {
            scores: Array2::from_shape_vec((q, k), scores).expect("q x k scores"),
            indices: Array2::from_shape_vec((q, k), rows).expect("q x k rows"),
        })
    }
}

/// A gallery's GPU copy kept across searches: made on the first search, made again when the
/// gallery's generation (a count of its changes, kept by the caller) or the device changes.
#[derive(Default)]
pub struct GpuSearch {
    copy: Mutex<Option<(u64, Mirror)>>,
}

impl GpuSearch {
    /// `gallery.search_with` on GPU `device`, with ids; `generation` must change whenever
    /// the gallery does. The filter becomes a bitmask of the rows it lets through, applied
    /// where candidates are selected on the device. k above [`MAX_K`] runs the CPU search
    /// (the same results).
    pub fn search(
        &self,
        gallery: &Gallery,
        generation: u64,
        queries: ArrayView2<f32>,
        k: usize,
        device: usize,
        filter: Option<IdFilter>,
    ) -> Result<SearchResult<f32>> {
        if k > MAX_K {
            return gallery.search_with(queries, k, filter);
        }
        let mask = filter.map(|f| gallery.row_mask(f));
        let mut copy = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = matches!(&*copy, Some((g, m)) if *g == generation && m.ordinal() == device);
        if !fresh {
            *copy = None; // free the stale copy before making the new one
            *copy = Some((generation, Mirror::new(gallery, device)?));
        }
        let (_, mirror) = copy.as_mut().expect("just made");
        let mut result = mirror.search_rows(queries, k, mask.as_deref())?;
        let ids = gallery.ids();
        result
            .indices
            .mapv_inplace(|row| if row >= 0 { ids[row as usize] } else { -1 });
        Ok(result)
    }

    /// Device bytes the copy holds (0 before the first search).
    pub fn nbytes(&self) -> usize {
        let copy = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        copy.as_ref().map_or(0, |(_, m)| m.nbytes())
    }
}
