//! A gallery of enrolled embeddings with ids, stored as float32, float16, bfloat16 or int8.
//!
//! Rows are L2-normalised when added, so a search only needs dot products. The compressed
//! dtypes trade exactness for memory bandwidth (the search is bound by it): float16 halves
//! the bytes read, int8 quarters them. An int8 row keeps one float32 scale per row, chosen
//! so that `codes * scale` is itself a unit vector: the score is then the exact cosine
//! between the query and the stored (quantised) vector.

use super::ids::IdMap;
use super::journal::{RowChange, RowJournal};
use super::topk::TopK;
use super::{collect, search_rows, unit_queries, Filtered, Rows, SearchResult, Subset};
use crate::error::{unnormalisable, Error, Result};
use crate::kernels;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Stored values: owned, or a window of a read-only file mapping (`load` with mmap), copied
/// into memory the first time the gallery changes.
#[derive(Clone)]
pub enum Store<T> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
        _values: std::marker::PhantomData<T>,
    },
}

impl<T: Copy> Store<T> {
    /// `len` values of `T` at byte `offset` of `map`, if they lie inside it and are aligned
    /// for `T` (little-endian machines only: the file is little-endian).
    pub fn mapped(map: Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let fits = offset
            .checked_add(bytes)
            .is_some_and(|end| end <= map.len());
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        (cfg!(target_endian = "little") && fits && aligned).then(|| Store::Mapped {
            map,
            offset,
            len,
            _values: std::marker::PhantomData,
        })
    }

    /// The values as a vector that can grow (copying them out of the mapping first).
    fn owned(&mut self) -> &mut Vec<T> {
        if let Store::Mapped { .. } = self {
            *self = Store::Owned(self.to_vec());
        }
        match self {
            Store::Owned(v) => v,
            Store::Mapped { .. } => unreachable!("just copied"),
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Store::Mapped { .. })
    }
}

impl<T: Copy> Deref for Store<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Store::Owned(v) => v,
            // SAFETY: `mapped` checked bounds and alignment; the mapping lives as long as
            // the Arc; T is a plain number type (f32, u16, i8) for which every bit pattern
            // is a value. The file must not be changed in place while mapped (saves never
            // do that: they replace the file by renaming).
            Store::Mapped {
                map, offset, len, ..
            } => unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len) },
        }
    }
}

impl<T: Copy + PartialEq> PartialEq for Store<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Copy> fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Store({kind}, {} values)", self.len())
    }
}

/// How a gallery stores its vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    I8,
}

impl Dtype {
    /// The names the Python API uses.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::I8 => "int8",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float32" => Ok(Dtype::F32),
            "float16" => Ok(Dtype::F16),
            "bfloat16" => Ok(Dtype::BF16),
            "int8" => Ok(Dtype::I8),
            other => Err(Error::invalid(
                "dtype",
                format!("must be 'float32', 'float16', 'bfloat16' or 'int8', got {other:?}"),
            )),
        }
    }

    /// Bytes per stored value (an int8 row also keeps a 4-byte scale).
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I8 => 1,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The stored rows, row-major, `dim` values each.
#[derive(Clone, Debug, PartialEq)]
pub enum Codes {
    F32(Store<f32>),
    F16(Store<u16>),
    BF16(Store<u16>),
    /// Codes in -127..=127 and one scale per row.
    I8(Store<i8>, Vec<f32>),
}

impl Codes {
    pub fn empty(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => Codes::F32(Store::Owned(Vec::new())),
            Dtype::F16 => Codes::F16(Store::Owned(Vec::new())),
            Dtype::BF16 => Codes::BF16(Store::Owned(Vec::new())),
            Dtype::I8 => Codes::I8(Store::Owned(Vec::new()), Vec::new()),
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Codes::F32(_) => Dtype::F32,
            Codes::F16(_) => Dtype::F16,
            Codes::BF16(_) => Dtype::BF16,
            Codes::I8(..) => Dtype::I8,
        }
    }

    /// Whether the rows are read from a file mapping.
    pub fn is_mapped(&self) -> bool {
        match self {
            Codes::F32(v) => v.is_mapped(),
            Codes::F16(v) | Codes::BF16(v) => v.is_mapped(),
            Codes::I8(v, _) => v.is_mapped(),
        }
    }

    fn values(&self) -> usize {
        match self {
            Codes::F32(v) => v.len(),
            Codes::F16(v) | Codes::BF16(v) => v.len(),
            Codes::I8(v, _) => v.len(),
        }
    }

    /// Room for `rows` more rows of `dim` values, on huge pages where the system allows
    /// (a search streams the whole gallery: 4 KiB pages cost ~10% in TLB misses).
    /// Room for `rows` more rows; a refused allocation is a `MemoryError` naming `emb`.
    fn reserve_rows(&mut self, rows: usize, dim: usize) -> Result<()> {
        let values = rows.saturating_mul(dim);
        let bytes = rows as u128 * dim as u128 * self.dtype().bytes() as u128;
        let refused = |_| Error::out_of_memory("emb", "the gallery's new rows", bytes, None);
        match self {
            Codes::F32(v) => crate::pages::reserve_huge(v.owned(), values).map_err(refused),
            Codes::F16(v) | Codes::BF16(v) => {
                crate::pages::reserve_huge(v.owned(), values).map_err(refused)
            }
            Codes::I8(v, scales) => {
                crate::pages::reserve_huge(v.owned(), values).map_err(refused)?;
                scales.try_reserve(rows).map_err(refused)
            }
        }
    }

    /// Appends one unit-norm row.
    fn push(&mut self, unit: &[f32]) {
        match self {
            Codes::F32(v) => v.owned().extend_from_slice(unit),
            Codes::F16(v) => v
                .owned()
                .extend(unit.iter().map(|&x| half::f16::from_f32(x).to_bits())),
            Codes::BF16(v) => v
                .owned()
                .extend(unit.iter().map(|&x| half::bf16::from_f32(x).to_bits())),
            Codes::I8(v, scales) => {
                let v = v.owned();
                let max = unit.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let step = max / 127.0;
                let start = v.len();
                v.extend(
                    unit.iter()
                        .map(|&x| (x / step).round().clamp(-127.0, 127.0) as i8),
                );
                let norm = v[start..]
                    .iter()
                    .map(|&c| (c as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                scales.push((1.0 / norm) as f32);
            }
        }
    }

    /// Keeps the rows whose flag is true, in order.
    fn retain_rows(&mut self, dim: usize, keep: &[bool]) {
        fn retain<T: Copy>(v: &mut Vec<T>, width: usize, keep: &[bool]) {
            let mut out = 0;
            for (r, &k) in keep.iter().enumerate() {
                if k {
                    v.copy_within(r * width..(r + 1) * width, out * width);
                    out += 1;
                }
            }
            v.truncate(out * width);
        }
        match self {
            Codes::F32(v) => retain(v.owned(), dim, keep),
            Codes::F16(v) | Codes::BF16(v) => retain(v.owned(), dim, keep),
            Codes::I8(v, scales) => {
                retain(v.owned(), dim, keep);
                retain(scales, 1, keep);
            }
        }
    }
}

/// The longest row a gallery holds: 2**24 values (64 MiB in float32), far beyond any
/// embedding; longer rows are refused at construction and when a file claims them.
pub const MAX_DIM: usize = 1 << 24;

/// Enrolled embeddings and their int64 ids. Not synchronised: the bindings wrap it in a lock.
#[derive(Clone, Debug)]
pub struct Gallery {
    dim: usize,
    codes: Codes,
    ids: Vec<i64>,
    rows_by_id: IdMap,
    /// Where automatic ids continue: one past the largest id ever added.
    next_id: i64,
    /// Recent adds and removes, for copies that follow the rows (the GPU's).
    journal: RowJournal,
}

impl Gallery {
    pub fn new(dim: usize, dtype: Dtype) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be >= 1"));
        }
        if dim > MAX_DIM {
            // A row this long overflows the sizes computed from it (a float32 row of 2**61
            // values is 2**63 bytes) and could never be allocated anyway.
            return Err(Error::invalid(
                "dim",
                format!("must be at most {MAX_DIM} (2**24 values per row), got {dim}"),
            ));
        }
        Ok(Gallery {
            dim,
            codes: Codes::empty(dtype),
            ids: Vec::new(),
            rows_by_id: IdMap::default(),
            next_id: 0,
            journal: RowJournal::default(),
        })
    }

    /// A gallery from stored rows (as read from a file): every row is checked to be finite
    /// and of unit norm, ids to be unique, so a damaged file cannot give a wrong gallery.
    pub fn from_parts(dim: usize, codes: Codes, ids: Vec<i64>) -> Result<Self> {
        let mut g = Gallery::new(dim, codes.dtype())?;
        if Some(codes.values()) != ids.len().checked_mul(dim) {
            return Err(Error::invalid(
                "vectors",
                format!(
                    "hold {} values, expected {} rows x {dim}",
                    codes.values(),
                    ids.len()
                ),
            ));
        }
        if let Codes::I8(_, scales) = &codes {
            if scales.len() != ids.len() {
                return Err(Error::invalid(
                    "scales",
                    format!("has {} entries for {} rows", scales.len(), ids.len()),
                ));
            }
        }
        g.codes = codes;
        g.rows_by_id.reserve(ids.len());
        for (row, &id) in ids.iter().enumerate() {
            if id < 0 {
                return Err(Error::invalid(
                    "ids",
                    format!("id {id} is negative; galleries hold ids >= 0"),
                ));
            }
            if g.rows_by_id.insert(id, row).is_some() {
                return Err(Error::invalid("ids", format!("id {id} appears twice")));
            }
        }
        g.next_id = ids.iter().max().map_or(0, |&m| m.saturating_add(1));
        g.ids = ids;
        g.check_rows()?;
        Ok(g)
    }

    /// Every stored row must decode to a finite unit vector (to the storage's precision).
    fn check_rows(&self) -> Result<()> {
        let tolerance = match self.dtype() {
            Dtype::F32 => 1e-4,
            Dtype::F16 | Dtype::I8 => 5e-3,
            Dtype::BF16 => 2e-2,
        };
        let mut decoded = Vec::new();
        let mut mult = vec![0.0f32; 1];
        let mut bad = None;
        for row in 0..self.len() {
            self.mults(row, row + 1, &mut mult, &mut bad);
            let v = self.decoded(row, row + 1, &mut decoded);
            let norm = kernels::sum_squares(v).sqrt() * mult[0] as f64;
            if !(norm - 1.0).abs().le(&tolerance) {
                return Err(Error::invalid(
                    "vectors",
                    format!(
                        "row {row} has norm {norm}, expected a unit vector: the data is damaged"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn dtype(&self) -> Dtype {
        self.codes.dtype()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    pub fn next_id(&self) -> i64 {
        self.next_id
    }

    /// Automatic ids continue from here (never below one past the largest id held).
    pub fn set_next_id(&mut self, next: i64) {
        self.next_id = self.next_id.max(next);
    }

    pub fn codes(&self) -> &Codes {
        &self.codes
    }

    /// Bytes held by the vectors (and int8 scales), without the id index.
    pub fn vector_bytes(&self) -> usize {
        let scales = if self.dtype() == Dtype::I8 {
            4 * self.len()
        } else {
            0
        };
        self.codes.values() * self.dtype().bytes() + scales
    }

    /// Adds rows (normalised here) under `ids`, or under fresh ids counting up from one past
    /// the largest id ever held. All or nothing: on any error the gallery is unchanged.
    pub fn add(
        &mut self,
        emb: ArrayView2<f32>,
        ids: Option<ArrayView1<i64>>,
    ) -> Result<Array1<i64>> {
        let (n, d) = emb.dim();
        if d != self.dim {
            return Err(Error::invalid(
                "emb",
                format!("has {d} columns but the gallery's dim is {}", self.dim),
            ));
        }
        // Rows are read one at a time through their strides (a broadcast array can claim
        // more rows than memory holds): only what is stored is allocated (codes, scale, id,
        // its map entry and the call's norms), checked before anything else.
        let stored = (self.len() as u128 + n as u128)
            * (d as u128 * self.dtype().bytes() as u128 + 4 + 8 + 16 + 8);
        crate::limits::check_memory("emb", stored, "the gallery with these rows added")?;
        let ids: Array1<i64> = match ids {
            Some(ids) => {
                if ids.len() != n {
                    return Err(Error::invalid(
                        "ids",
                        format!("has {} entries for {n} embeddings", ids.len()),
                    ));
                }
                let mut seen = std::collections::HashSet::with_capacity(n);
                for &id in ids {
                    if id < 0 {
                        // -1 marks "no result" in search and "unknown" in identify, so a
                        // negative id could not be told apart from them.
                        return Err(Error::invalid(
                            "ids",
                            format!("id {id} is negative; ids must be >= 0 (-1 marks no match)"),
                        ));
                    }
                    if self.rows_by_id.contains_key(&id) || !seen.insert(id) {
                        return Err(Error::invalid(
                            "ids",
                            format!("id {id} is already in the gallery or given twice"),
                        ));
                    }
                }
                ids.to_owned()
            }
            None => {
                let last = self
                    .next_id
                    .checked_add(n as i64)
                    .ok_or_else(|| Error::invalid("ids", "automatic ids would overflow int64"))?;
                Array1::from_iter(self.next_id..last)
            }
        };
        let mut row_buf = vec![0.0f32; d];
        let mut norms = crate::limits::filled("emb", n, 0.0f64, "the rows' norms")?;
        for (i, norm) in norms.iter_mut().enumerate() {
            *norm = kernels::norm(row_of(&emb, i, &mut row_buf));
            if let Some(e) = unnormalisable("emb", i, *norm) {
                return Err(e);
            }
        }
        self.codes.reserve_rows(n, d)?;
        self.ids.try_reserve(n).map_err(|_| {
            Error::out_of_memory("emb", "the ids of the new rows", n as u128 * 8, None)
        })?;
        let mut unit = vec![0.0f32; d];
        for (i, &norm) in norms.iter().enumerate() {
            for (u, &x) in unit.iter_mut().zip(row_of(&emb, i, &mut row_buf)) {
                *u = (x as f64 / norm) as f32;
            }
            self.codes.push(&unit);
        }
        let base = self.ids.len();
        for (i, &id) in ids.iter().enumerate() {
            self.rows_by_id.insert(id, base + i);
            self.next_id = self.next_id.max(id.saturating_add(1));
        }
        self.ids.extend(ids.iter().copied());
        if n > 0 {
            self.journal.record(RowChange::Appended(n));
        }
        Ok(ids)
    }

    /// Removes the rows with these ids. All or nothing: an unknown id is an error and
    /// removes nothing. Remaining rows keep their order.
    pub fn remove(&mut self, ids: ArrayView1<i64>) -> Result<usize> {
        let mut keep = vec![true; self.len()];
        for &id in ids {
            match self.rows_by_id.get(&id) {
                Some(&row) if !keep[row] => {
                    return Err(Error::invalid("ids", format!("id {id} is given twice")))
                }
                Some(&row) => keep[row] = false,
                None => {
                    return Err(Error::invalid(
                        "ids",
                        format!("id {id} is not in the gallery"),
                    ))
                }
            }
        }
        let removed = keep.iter().filter(|&&k| !k).count();
        if removed == 0 {
            return Ok(0);
        }
        self.codes.retain_rows(self.dim, &keep);
        let mut row = 0;
        self.ids.retain(|_| {
            let k = keep[row];
            row += 1;
            k
        });
        self.rows_by_id = self
            .ids
            .iter()
            .enumerate()
            .map(|(r, &id)| (id, r))
            .collect();
        let positions = (0..keep.len()).filter(|&r| !keep[r]).collect();
        self.journal.record(RowChange::Removed(positions));
        Ok(removed)
    }

    /// How many changes (adds, removes) the rows have seen.
    pub fn stamp(&self) -> u64 {
        self.journal.stamp()
    }

    /// The changes to the rows after `stamp` (oldest first), or None where they are no
    /// longer known (then a copy made at `stamp` must be made again).
    pub fn changes_since(&self, stamp: u64) -> Option<&[RowChange]> {
        self.journal.since(stamp)
    }

    /// The rows `filter` lets through as a bitmask: bit r of word r / 32 set where row r may
    /// be returned (ids the gallery lacks are ignored, as in [`Gallery::search_with`]).
    pub fn row_mask(&self, filter: IdFilter) -> Vec<u32> {
        let n = self.len();
        let (list, allow) = match filter {
            IdFilter::Allow(l) => (l, true),
            IdFilter::Deny(l) => (l, false),
        };
        let mut mask = vec![if allow { 0 } else { u32::MAX }; n.div_ceil(32)];
        for row in list.iter().filter_map(|id| self.rows_by_id.get(id)) {
            let bit = 1u32 << (row % 32);
            if allow {
                mask[row / 32] |= bit;
            } else {
                mask[row / 32] &= !bit;
            }
        }
        mask
    }

    /// Top-`k` rows by cosine for each query, as ids; padded with id -1 and score -inf when
    /// `k` exceeds the gallery. Ties go to the row added first.
    pub fn search(&self, queries: ArrayView2<f32>, k: usize) -> Result<SearchResult<f32>> {
        self.search_with(queries, k, None)
    }

    /// [`Gallery::search`] over the rows that `filter` lets through (exact over them; ids
    /// in an allow- or deny-list that the gallery lacks are ignored).
    pub fn search_with(
        &self,
        queries: ArrayView2<f32>,
        k: usize,
        filter: Option<IdFilter>,
    ) -> Result<SearchResult<f32>> {
        if k == 0 {
            return Err(Error::invalid("k", "must be >= 1"));
        }
        crate::limits::check_results("k", k, queries.nrows(), 4 + 8)?;
        let qhat = unit_queries(queries, self.dim, false)?;
        if self.is_empty() {
            // as faiss does: every column is padding
            return Ok(collect(vec![TopK::new(0); qhat.nrows()], k, |_| -1));
        }
        if let Some(IdFilter::Allow(list)) = filter {
            // only the allowed rows are read: a search of them as a gallery of their own
            // ids counted up from 0 and never removed are their own rows: no lookups
            let n = self.ids.len() as i64;
            let own_rows = self
                .ids
                .par_iter()
                .enumerate()
                .all(|(row, &id)| id == row as i64);
            let mut positions: Vec<usize> = if own_rows {
                list.iter()
                    .filter(|&&id| (0..n).contains(&id))
                    .map(|&id| id as usize)
                    .collect()
            } else {
                list.par_iter()
                    .filter_map(|id| self.rows_by_id.get(id).copied())
                    .collect()
            };
            positions.par_sort_unstable();
            positions.dedup();
            let k_rows = k.min(positions.len());
            if k_rows == 0 {
                return Ok(collect(vec![TopK::new(0); qhat.nrows()], k, |_| -1));
            }
            let positions = &positions[..];
            // (the gallery's rows are unit vectors, checked when added: no norms to take)
            let rows = Subset {
                rows: self,
                positions,
            };
            let (tops, bad) = search_rows(qhat.view(), &rows, k_rows);
            debug_assert!(bad.is_none(), "rows are checked when added");
            return Ok(collect(tops, k, |i| self.ids[positions[i]]));
        }
        let k_rows = k.min(self.len());
        let (tops, bad) = match (&self.codes, filter) {
            // Every storage, float32 included, is read through the stored-row kernels: the
            // rows are unit vectors (normalised on `add`, checksummed on `load`), so one
            // query needs only its dot products, not the rows' norms as well.
            (_, None) => search_rows(qhat.view(), self, k_rows),
            (_, Some(f)) => search_rows(qhat.view(), &f.over(self, &self.ids), k_rows),
        };
        debug_assert!(bad.is_none(), "rows are checked when added");
        Ok(collect(tops, k, |row| self.ids[row]))
    }

    /// Open-set identification: each query's best id and score, id -1 where the best score
    /// is below `threshold`.
    pub fn identify(
        &self,
        queries: ArrayView2<f32>,
        threshold: f32,
    ) -> Result<(Array1<i64>, Array1<f32>)> {
        self.identify_with(queries, threshold, None)
    }

    /// [`Gallery::identify`] over the rows `filter` lets through.
    pub fn identify_with(
        &self,
        queries: ArrayView2<f32>,
        threshold: f32,
        filter: Option<IdFilter>,
    ) -> Result<(Array1<i64>, Array1<f32>)> {
        if threshold.is_nan() {
            return Err(Error::invalid("threshold", "is NaN"));
        }
        let top = self.search_with(queries, 1, filter)?;
        let scores = top.scores.index_axis(Axis(1), 0).to_owned();
        let ids = ndarray::Zip::from(top.indices.index_axis(Axis(1), 0))
            .and(&scores)
            .map_collect(|&id, &s| if s >= threshold { id } else { -1 });
        Ok((ids, scores))
    }

    /// Every row scoring above `threshold` for each query, best first (ties: the row
    /// added first), in faiss's layout: `(lims, scores, ids)` with query i's results at
    /// `lims[i]..lims[i + 1]`. Exact for float32 storage, within the storage's rounding
    /// otherwise (as `search`).
    pub fn range_search(
        &self,
        queries: ArrayView2<f32>,
        threshold: f32,
    ) -> Result<(Vec<u64>, Vec<f32>, Vec<i64>)> {
        if threshold.is_nan() {
            return Err(Error::invalid("threshold", "is NaN"));
        }
        let qhat = unit_queries(queries, self.dim, false)?;
        let q = qhat.nrows();
        const BLOCK: usize = 4096;
        let (n, d) = (self.len(), self.dim);
        let blocks: Vec<usize> = (0..n).step_by(BLOCK).collect();
        let per_query: Vec<Vec<(f32, usize)>> = blocks
            .par_iter()
            .fold(
                || {
                    (
                        vec![Vec::new(); q],
                        vec![0.0f32; BLOCK],
                        vec![0.0f32; BLOCK],
                    )
                },
                |(mut hits, mut dots, mut mult), &lo| {
                    let hi = (lo + BLOCK).min(n);
                    let mut bad = None;
                    self.mults(lo, hi, &mut mult[..hi - lo], &mut bad);
                    for (i, query) in qhat.axis_iter(Axis(0)).enumerate() {
                        let query = query.as_slice().expect("standard layout");
                        debug_assert_eq!(query.len(), d);
                        self.dots(query, lo, hi, &mut dots[..hi - lo]);
                        for (r, (&dot, &m)) in dots.iter().zip(&mult).take(hi - lo).enumerate() {
                            let score = (dot * m).clamp(-1.0, 1.0);
                            if score > threshold {
                                hits[i].push((score, lo + r));
                            }
                        }
                    }
                    (hits, dots, mult)
                },
            )
            .map(|(hits, ..)| hits)
            .reduce(
                || vec![Vec::new(); q],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        x.extend(y);
                    }
                    a
                },
            );
        let mut lims = Vec::with_capacity(q + 1);
        lims.push(0u64);
        let (mut scores, mut ids) = (Vec::new(), Vec::new());
        for mut hits in per_query {
            hits.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (score, row) in hits {
                scores.push(score);
                ids.push(self.ids[row]);
            }
            lims.push(scores.len() as u64);
        }
        Ok((lims, scores, ids))
    }

    /// The stored vectors of `ids`, decoded to float32, in the order asked; an id the
    /// gallery lacks is an error naming it.
    pub fn get(&self, ids: &[i64]) -> Result<Array2<f32>> {
        let missing: Vec<i64> = ids
            .iter()
            .filter(|id| !self.rows_by_id.contains_key(id))
            .take(5)
            .copied()
            .collect();
        if !missing.is_empty() {
            let more = if missing.len() == 5 { " ..." } else { "" };
            return Err(Error::invalid(
                "ids",
                format!("not in the gallery: {missing:?}{more}"),
            ));
        }
        let mut out = Array2::zeros((ids.len(), self.dim));
        let (mut decoded, mut mult, mut bad) = (Vec::new(), [0.0f32], None);
        for (id, mut dst) in ids.iter().zip(out.axis_iter_mut(Axis(0))) {
            let row = self.rows_by_id[id];
            self.mults(row, row + 1, &mut mult, &mut bad);
            let v = self.decoded(row, row + 1, &mut decoded);
            for (o, &x) in dst.iter_mut().zip(v) {
                *o = x * mult[0];
            }
        }
        Ok(out)
    }

    /// All rows decoded to float32 (unit vectors), in gallery order.
    pub fn vectors(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.len(), self.dim));
        let mut decoded = Vec::new();
        let mut mult = vec![0.0f32; 1];
        let mut bad = None;
        for (row, mut dst) in out.axis_iter_mut(Axis(0)).enumerate() {
            self.mults(row, row + 1, &mut mult, &mut bad);
            let v = self.decoded(row, row + 1, &mut decoded);
            for (d, &x) in dst.iter_mut().zip(v) {
                *d = x * mult[0];
            }
        }
        out
    }
}

/// Row `i` of `m` as a slice: its own memory when contiguous, else copied into `buf`.
fn row_of<'a>(m: &'a ArrayView2<f32>, i: usize, buf: &'a mut [f32]) -> &'a [f32] {
    let row = m.row(i);
    if let Some(slice) = row.to_slice() {
        return slice;
    }
    buf.iter_mut().zip(row).for_each(|(b, &x)| *b = x);
    buf
}

/// Which rows a filtered search may return, by id.
#[derive(Clone, Copy, Debug)]
pub enum IdFilter<'a> {
    /// Only these ids.
    Allow(&'a [i64]),
    /// Every id but these.
    Deny(&'a [i64]),
}

impl IdFilter<'_> {
    /// `rows` (whose ids are `ids`) restricted by this filter: the list sorted once, then a
    /// binary search for each row that reaches a query's threshold.
    fn over<'a, R>(&self, rows: &'a R, ids: &'a [i64]) -> Filtered<'a, R> {
        let (list, allow) = match *self {
            IdFilter::Allow(l) => (l, true),
            IdFilter::Deny(l) => (l, false),
        };
        let mut list = list.to_vec();
        list.par_sort_unstable();
        list.dedup();
        Filtered {
            rows,
            ids,
            list,
            allow,
        }
    }
}

impl Rows<f32> for Gallery {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn mults(&self, lo: usize, hi: usize, mult: &mut [f32], _bad: &mut Option<(usize, Error)>) {
        match &self.codes {
            Codes::I8(_, scales) => mult.copy_from_slice(&scales[lo..hi]),
            _ => mult.fill(1.0),
        }
    }

    fn mults_at(&self, positions: &[usize], mult: &mut [f32], _bad: &mut Option<(usize, Error)>) {
        match &self.codes {
            Codes::I8(_, scales) => {
                for (m, &p) in mult.iter_mut().zip(positions) {
                    *m = scales[p];
                }
            }
            _ => mult.fill(1.0),
        }
    }

    fn dots_at(&self, query: &[f32], positions: &[usize], out: &mut [f32]) {
        let (d, mut at) = (self.dim, positions.iter().copied());
        match &self.codes {
            Codes::F32(v) => kernels::dots_f32_at(query, v, d, &mut at, out),
            Codes::F16(v) => kernels::dots_f16_at(query, v, d, &mut at, out),
            Codes::BF16(v) => kernels::dots_bf16_at(query, v, d, &mut at, out),
            Codes::I8(v, _) => kernels::dots_i8_at(query, v, d, &mut at, out),
        }
    }

    fn dots(&self, query: &[f32], lo: usize, hi: usize, out: &mut [f32]) {
        let (a, b) = (lo * self.dim, hi * self.dim);
        match &self.codes {
            Codes::F32(v) => kernels::dots_f32(query, &v[a..b], out),
            Codes::F16(v) => kernels::dots_f16(query, &v[a..b], out),
            Codes::BF16(v) => kernels::dots_bf16(query, &v[a..b], out),
            Codes::I8(v, _) => kernels::dots_i8(query, &v[a..b], out),
        }
    }

    fn decoded<'a>(&'a self, lo: usize, hi: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let (a, b) = (lo * self.dim, hi * self.dim);
        let into = |scratch: &'a mut Vec<f32>, decode: &dyn Fn(&mut [f32])| -> &'a [f32] {
            scratch.resize(b - a, 0.0);
            decode(scratch);
            scratch
        };
        match &self.codes {
            Codes::F32(v) => &v[a..b], // float32 rows are read where they are: no scratch
            Codes::F16(v) => into(scratch, &|s| kernels::decode_f16(&v[a..b], s)),
            Codes::BF16(v) => into(scratch, &|s| kernels::decode_bf16(&v[a..b], s)),
            Codes::I8(v, _) => into(scratch, &|s| kernels::decode_i8(&v[a..b], s)),
        }
    }
}

#[cfg(test)]
mod tests;
