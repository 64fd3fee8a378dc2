//! A Gallery's rows on a GPU, searched there (`Gallery(..., device="cuda")`).
//!
//! The mirror holds the rows in the gallery's storage type (float32, float16, bfloat16, or
//! int8 codes with their per-row scales): the bytes the CPU search reads, decoded in the
//! kernels. It is built from the gallery on first search, with room for more rows, and then
//! follows the gallery's journal: added rows are appended (only they are uploaded), removed
//! rows are masked out on the device (a bit per row). It is built again when the room runs
//! out, when removed rows outnumber the live ones, or when the journal has forgotten the
//! changes.

use super::device::{Arg, Carver, Device};
use super::driver::{with_stream, DeviceBuffer};
use super::search::{self, SearchBuffers, SearchShape, SearchTiling, Stored, MAX_K};
use crate::search::gallery::{Codes, Gallery, IdFilter};
use crate::search::journal::RowChange;
use crate::search::{unit_queries, SearchResult};
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2, Axis};
use std::sync::Mutex;

/// A gallery's rows in device memory.
pub struct Mirror {
    ordinal: usize,
    /// Room for `capacity` rows; the first `ids.len()` hold rows.
    rows: DeviceBuffer,
    /// int8 rows' scales.
    scales: Option<DeviceBuffer>,
    stored: Stored,
    d: usize,
    capacity: usize,
    /// The gallery's stamp this copy is up to date with.
    stamp: u64,
    /// The id of each device row (a removed row keeps its own; it is masked out).
    ids: Vec<i64>,
    /// The device row of each gallery row, in the gallery's order.
    device_rows: Vec<usize>,
    /// One bit per device row (of `capacity`), cleared for removed rows; on the device too
    /// once a row is removed.
    live: Vec<u32>,
    live_on_device: Option<DeviceBuffer>,
    removed: usize,
    /// `ids` on the device (room for `capacity`), made for the first search with device
    /// queries, whose results are mapped to ids there.
    ids_on_device: Option<DeviceBuffer>,
    /// The last search's scratch (queries, results, workspace), kept for the next one:
    /// allocating device memory is a synchronous driver call.
    scratch: Option<DeviceBuffer>,
}

/// Rows of room a new copy leaves for adds: 1/32 of the gallery, at least 1024. Room is
/// device memory held for rows that may never come, and the search's scratch must fit
/// beside it in 256 MiB at Q=1024 (1M float16 rows: 32 MiB of room); running out costs
/// one upload of the rows per 1/32 of growth, a small part of the uploads it saves.
pub(crate) fn room_for(rows: usize) -> usize {
    rows + (rows / 32).max(1024)
}

/// The scratch of a search of host queries, one allocation carved up (each allocation is a
/// synchronous driver call): offsets of the unit queries, the (Q, k) scores and rows, the
/// search's workspace, the filter's `mask_words` and the unsure flags of a `rescored`
/// search; and its size in bytes.
pub(crate) fn host_queries_layout(
    shape: SearchShape,
    mask_words: usize,
    rescored: bool,
) -> ([u64; 6], usize) {
    let found = shape.q * shape.k;
    let tiling = SearchTiling::default();
    let mut layout = Carver::new(0);
    let offsets = [
        layout.take(shape.q * shape.d, 4),
        layout.take(found, 4),
        layout.take(found, 8),
        layout.take(search::workspace_bytes(shape, tiling, rescored), 1),
        layout.take(mask_words, 4),
        layout.take(if rescored { shape.q } else { 0 }, 4),
    ];
    (offsets, layout.bytes())
}

/// The caller's workspace of a search of device queries, carved up: offsets of the unit
/// queries, the search's workspace, the filter's `mask_words` and a rescored search's unsure
/// flags (its unsure queries are searched again on the device, [`search::redo_unsure`]); and
/// its size in bytes.
pub(crate) fn device_queries_layout(shape: SearchShape, mask_words: usize) -> ([u64; 4], usize) {
    let rescored = search::rescores(shape);
    let mut layout = Carver::new(0);
    let offsets = [
        layout.take(shape.q * shape.d, 4),
        layout.take(
            search::workspace_bytes(shape, SearchTiling::default(), rescored),
            1,
        ),
        layout.take(mask_words, 4),
        layout.take(if rescored { shape.q } else { 0 }, 4),
    ];
    (offsets, layout.bytes())
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
        let capacity = room_for(n);
        // the gallery's size sets these; `device` is the argument that sends it there
        let what = format!("the GPU copy of {n} rows (room for {capacity})");
        let rows = DeviceBuffer::new(ordinal, capacity * d * stored.size(), "device", &what)?;
        let scales = match stored {
            Stored::I8 => Some(DeviceBuffer::new(
                ordinal,
                capacity * 4,
                "device",
                &format!("{what}'s int8 scales"),
            )?),
            _ => None,
        };
        let mut mirror = Mirror {
            ordinal,
            rows,
            scales,
            stored,
            d,
            capacity,
            stamp: gallery.stamp(),
            ids: Vec::new(),
            device_rows: Vec::new(),
            live: vec![0; capacity.div_ceil(32)],
            live_on_device: None,
            removed: 0,
            ids_on_device: None,
            scratch: None,
        };
        mirror.append(gallery, 0)?;
        Ok(mirror)
    }

    /// Uploads the gallery's rows from `first` on after the rows the copy holds, and takes
    /// them into the copy (nothing changes if the upload fails).
    fn append(&mut self, gallery: &Gallery, first: usize) -> Result<()> {
        let (d, used) = (self.d, self.ids.len());
        let count = gallery.len() - first;
        if count == 0 {
            return Ok(());
        }
        let at = self.rows.ptr() + (used * d * self.stored.size()) as u64;
        let (lo, hi) = (first * d, gallery.len() * d);
        with_stream(self.ordinal, 0, |s| match gallery.codes() {
            Codes::F32(v) => s.upload(at, &v[lo..hi]),
            Codes::F16(v) | Codes::BF16(v) => s.upload(at, &v[lo..hi]),
            Codes::I8(v, scale) => {
                s.upload(at, &v[lo..hi])?;
                let scales = self.scales.as_ref().expect("an int8 copy has scales");
                s.upload(scales.ptr() + (used * 4) as u64, &scale[first..])
            }
        })?;
        if let Some(ids) = &self.ids_on_device {
            let at = ids.ptr() + (used * 8) as u64;
            with_stream(self.ordinal, 0, |s| s.upload(at, &gallery.ids()[first..]))?;
        }
        self.ids.extend_from_slice(&gallery.ids()[first..]);
        self.device_rows.extend(used..used + count);
        for row in used..used + count {
            self.live[row / 32] |= 1 << (row % 32);
        }
        Ok(())
    }

    /// Brings the copy up to `gallery` by its journal: Ok(false) (and the copy unchanged)
    /// where it must be built again instead.
    pub fn follow(&mut self, gallery: &Gallery) -> Result<bool> {
        let Some(changes) = gallery.changes_since(self.stamp) else {
            return Ok(false);
        };
        if changes.is_empty() {
            return Ok(true);
        }
        // the gallery's rows as device rows (None: not on the device yet), replayed
        let mut slots: Vec<Option<usize>> = self.device_rows.iter().map(|&r| Some(r)).collect();
        let mut gone = Vec::new();
        for change in changes {
            match change {
                RowChange::Appended(count) => slots.resize(slots.len() + count, None),
                RowChange::Removed(positions) => {
                    if positions.last().is_some_and(|&p| p >= slots.len()) {
                        return Ok(false);
                    }
                    let mut next = positions.iter().peekable();
                    let mut position = 0;
                    slots.retain(|slot| {
                        let drop = next.next_if_eq(&&position).is_some();
                        position += 1;
                        if drop {
                            gone.extend(*slot);
                        }
                        !drop
                    });
                }
            }
        }
        // rows not yet on the device are the newest, so they end the gallery
        let first = slots
            .iter()
            .position(Option::is_none)
            .unwrap_or(slots.len());
        let added = slots.len() - first;
        let used = self.ids.len();
        if slots.len() != gallery.len()
            || slots[first..].iter().any(Option::is_some)
            || used + added > self.capacity
            || 2 * (self.removed + gone.len()) > used + added
        {
            return Ok(false);
        }
        let mut live = self.live.clone();
        for &row in &gone {
            live[row / 32] &= !(1 << (row % 32));
        }
        for row in used..used + added {
            live[row / 32] |= 1 << (row % 32);
        }
        let removed = self.removed + gone.len();
        if removed > 0 {
            // the device mask first: nothing changes here if an upload fails
            if self.live_on_device.is_none() {
                self.live_on_device = Some(DeviceBuffer::new(
                    self.ordinal,
                    live.len() * 4,
                    "device",
                    "the GPU copy's mask of removed rows",
                )?);
            }
            let mask = self.live_on_device.as_ref().expect("made above").ptr();
            with_stream(self.ordinal, 0, |s| s.upload(mask, &live))?;
        }
        self.device_rows.truncate(0);
        self.device_rows
            .extend(slots[..first].iter().map(|r| r.expect("on the device")));
        self.live = live;
        self.removed = removed;
        self.append(gallery, first)?;
        self.stamp = gallery.stamp();
        Ok(true)
    }

    /// `gallery_mask` (one bit per gallery row, a [`Gallery::row_mask`]) as a mask over
    /// the device rows.
    pub fn device_mask(&self, gallery_mask: &[u32]) -> Vec<u32> {
        let mut mask = vec![0u32; self.live.len()];
        for (row, &device_row) in self.device_rows.iter().enumerate() {
            if gallery_mask[row / 32] >> (row % 32) & 1 == 1 {
                mask[device_row / 32] |= 1 << (device_row % 32);
            }
        }
        mask
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The id of a device row.
    pub fn id(&self, device_row: usize) -> i64 {
        self.ids[device_row]
    }

    /// Device memory the copy holds (rows with their room, int8 scales, the live mask, the
    /// ids).
    pub fn nbytes(&self) -> usize {
        [
            Some(&self.rows),
            self.scales.as_ref(),
            self.live_on_device.as_ref(),
            self.ids_on_device.as_ref(),
        ]
        .iter()
        .map(|b| b.map_or(0, DeviceBuffer::bytes))
        .sum()
    }

    /// The shape of a search of `q` queries for `k` (k capped at the device rows).
    fn shape(&self, q: usize, k: usize) -> SearchShape {
        let n = self.ids.len();
        SearchShape {
            n,
            d: self.d,
            q,
            k: k.min(n),
            stored: self.stored,
        }
    }

    /// Bytes of workspace [`Mirror::search_device`] needs, and the k it returns per query
    /// (at most the device rows).
    pub fn device_workspace(&self, q: usize, k: usize, filtered: bool) -> (usize, usize) {
        let shape = self.shape(q, k);
        // a filter is a [`Mirror::device_mask`]: one bit per device row
        let (_, bytes) = device_queries_layout(shape, if filtered { self.live.len() } else { 0 });
        (bytes, shape.k)
    }

    /// The search of queries already on the device, queued on `call.stream`: results (ids,
    /// clamped scores) land in the caller's (Q, k) buffers, k as [`Mirror::device_workspace`]
    /// says. Nothing is copied to the host; a filter's mask (`allowed`, a
    /// [`Mirror::device_mask`]) is copied to the device, which waits for the stream.
    pub fn search_device(&mut self, call: &DeviceQueries, allowed: Option<&[u32]>) -> Result<()> {
        let DeviceQueries { q, k, .. } = *call;
        if q == 0 || self.ids.is_empty() {
            return Err(Error::invalid(
                "queries",
                "a device search needs queries and a gallery with rows",
            ));
        }
        let shape = self.shape(q, k);
        let (offsets, bytes) = device_queries_layout(shape, allowed.map_or(0, <[u32]>::len));
        let kept = shape.k;
        if !(1..=MAX_K).contains(&kept) || call.workspace_bytes < bytes {
            return Err(Error::invalid(
                "workspace",
                format!(
                    "has {} bytes for k={k}; the search needs {bytes} and 1 <= k <= {MAX_K}",
                    call.workspace_bytes
                ),
            ));
        }
        if self.ids_on_device.is_none() {
            let ids = DeviceBuffer::new(
                self.ordinal,
                self.capacity * 8,
                "device",
                "the GPU copy's ids",
            )?;
            with_stream(self.ordinal, 0, |s| s.upload(ids.ptr(), &self.ids))?;
            self.ids_on_device = Some(ids);
        }
        let [unit, workspace, mask_at, unsure_at] = offsets.map(|o| call.workspace + o);
        let rescored = search::rescores(shape);
        let live = self.live_on_device.as_ref().filter(|_| self.removed > 0);
        let ids = self.ids_on_device.as_ref().expect("made above").ptr();
        with_stream(self.ordinal, call.stream, |s| {
            if let Some(mask) = allowed {
                s.upload(mask_at, mask)?;
            }
            // one warp per query row
            s.launch(
                "unit_queries",
                q.div_ceil(8),
                256,
                &[
                    Arg::Ptr(call.queries),
                    Arg::I32(q as i32),
                    Arg::I32(self.d as i32),
                    Arg::Ptr(unit),
                ],
            )?;
            let buffers = SearchBuffers {
                rows: self.rows.ptr(),
                scales: self.scales.as_ref().map_or(0, DeviceBuffer::ptr),
                queries: unit,
                workspace,
                out_s: call.out_s,
                out_i: call.out_i,
                allowed: match (allowed, live) {
                    (Some(_), _) => mask_at,
                    (None, Some(mask)) => mask.ptr(),
                    (None, None) => 0,
                },
                unsure: if rescored { unsure_at } else { 0 },
            };
            search::search(s, shape, &buffers, SearchTiling::default())?;
            // the queries the rescore could not vouch for, again, without the host
            search::redo_unsure(s, shape, &buffers)?;
            let found = q * kept;
            s.launch(
                "finish_results",
                found.div_ceil(256),
                256,
                &[
                    Arg::Ptr(call.out_s),
                    Arg::Ptr(call.out_i),
                    Arg::Ptr(ids),
                    Arg::I64(found as i64),
                ],
            )
        })
    }

    /// Top-`k` of `queries` as device rows (see [`Mirror::id`]); -1 / -inf pad when `k`
    /// exceeds the live rows (or those `allowed` lets through: a [`Mirror::device_mask`];
    /// without one, the rows not removed). More than [`MAX_K`] per query (counting only
    /// rows that exist) is an error.
    pub fn search_rows(
        &mut self,
        queries: ArrayView2<f32>,
        k: usize,
        allowed: Option<&[u32]>,
    ) -> Result<SearchResult<f32>> {
        if k == 0 {
            return Err(Error::invalid("k", "must be >= 1"));
        }
        // the (Q, k) results come back to host memory: refused as the CPU search refuses
        // them, before the device's scratch or the host's buffers are allocated
        crate::limits::check_results("k", k, queries.nrows(), 4 + 8)?;
        if self.ids.is_empty() {
            return Err(Error::invalid("gallery", "is empty: add embeddings first"));
        }
        let qhat = unit_queries(queries, self.d, false)?;
        let q = qhat.nrows();
        let shape = self.shape(q, k);
        let kept = shape.k;
        let (mut host_s, mut host_i, unsure) =
            self.search_unit(qhat.view(), shape, allowed, true)?;
        // the queries a rescored search could not vouch for, searched again by the exact
        // route (rare: more rows than its spare candidates scored within rounding of the k-th)
        let redo: Vec<usize> = (0..q).filter(|&query| unsure[query] != 0).collect();
        if !redo.is_empty() {
            let again = qhat.select(Axis(0), &redo);
            let shape = self.shape(redo.len(), k);
            let (s, i, _) = self.search_unit(again.view(), shape, allowed, false)?;
            for (from, &query) in redo.iter().enumerate() {
                let (src, dst) = (
                    from * kept..(from + 1) * kept,
                    query * kept..(query + 1) * kept,
                );
                host_s[dst.clone()].copy_from_slice(&s[src.clone()]);
                host_i[dst].copy_from_slice(&i[src]);
            }
        }
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

    /// The (Q, k) scores and device rows of unit queries on the host, and each query's
    /// unsure flag (see [`SearchBuffers::unsure`]; all 0 unless `rescore` and the shape
    /// [`search::rescores`]).
    fn search_unit(
        &mut self,
        unit: ArrayView2<f32>,
        shape: SearchShape,
        allowed: Option<&[u32]>,
        rescore: bool,
    ) -> Result<(Vec<f32>, Vec<i64>, Vec<i32>)> {
        let live = self.live_on_device.as_ref().filter(|_| self.removed > 0);
        let rescored = rescore && search::rescores(shape);
        let found = shape.q * shape.k;
        let mask_words = allowed.map_or(0, <[u32]>::len);
        let (offsets, bytes) = host_queries_layout(shape, mask_words, rescored);
        if self.scratch.as_ref().is_none_or(|b| b.bytes() < bytes) {
            self.scratch = None; // free the small one first
            let what = format!("the scratch of {} queries with k={}", shape.q, shape.k);
            self.scratch = Some(DeviceBuffer::new(self.ordinal, bytes, "queries", &what)?);
        }
        let scratch = self.scratch.as_ref().expect("just made");
        let [queries_at, out_s_at, out_i_at, workspace_at, mask_at, unsure_at] =
            offsets.map(|o| scratch.ptr() + o);
        let mut host_s = vec![0f32; found];
        let mut host_i = vec![0i64; found];
        let mut unsure = vec![0i32; shape.q];
        with_stream(self.ordinal, 0, |s| {
            let unit = unit.as_slice().expect("unit queries are contiguous");
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
                allowed: match (allowed, live) {
                    (Some(_), _) => mask_at,
                    (None, Some(mask)) => mask.ptr(),
                    (None, None) => 0,
                },
                unsure: if rescored { unsure_at } else { 0 },
            };
            search::search(s, shape, &buffers, SearchTiling::default())?;
            // only (Q, k) comes back: the selection and the merge ran on the device
            s.download(&mut host_s, out_s_at)?;
            s.download(&mut host_i, out_i_at)?;
            if rescored {
                s.download(&mut unsure, unsure_at)?;
            }
            Ok(())
        })?;
        Ok((host_s, host_i, unsure))
    }
}

/// A search of queries in device memory (float32, (q, dim) contiguous), as the caller
/// (torch) allocated it: results and workspace are the caller's too.
#[derive(Clone, Copy, Debug)]
pub struct DeviceQueries {
    /// The CUDA stream to queue on (torch's current one).
    pub stream: u64,
    pub queries: u64,
    pub q: usize,
    pub k: usize,
    pub workspace: u64,
    pub workspace_bytes: usize,
    /// (q, kept k) float32 scores and int64 ids out.
    pub out_s: u64,
    pub out_i: u64,
}

/// A gallery's GPU copy kept across searches: made on the first search, brought up to date
/// by the gallery's journal before each search, made again when that is not possible or the
/// device changes.
#[derive(Default)]
pub struct GpuSearch {
    copy: Mutex<Option<Mirror>>,
}

impl GpuSearch {
    /// `gallery.search_with` on GPU `device`, with ids. The filter becomes a bitmask of the
    /// rows it lets through, applied where candidates are selected on the device. k above
    /// [`MAX_K`] runs the CPU search (the same results).
    pub fn search(
        &self,
        gallery: &Gallery,
        queries: ArrayView2<f32>,
        k: usize,
        device: usize,
        filter: Option<IdFilter>,
    ) -> Result<SearchResult<f32>> {
        if k > MAX_K {
            return gallery.search_with(queries, k, filter);
        }
        let mut copy = self.lock()?;
        let mirror = Self::current(&mut copy, gallery, device)?;
        let mask = filter.map(|f| mirror.device_mask(&gallery.row_mask(f)));
        let mut result = mirror.search_rows(queries, k, mask.as_deref())?;
        result.indices.mapv_inplace(|row| {
            if row >= 0 {
                mirror.id(row as usize)
            } else {
                -1
            }
        });
        Ok(result)
    }

    /// The copy on `device`, up to date with `gallery` (made or made again when needed).
    fn current<'a>(
        copy: &'a mut Option<Mirror>,
        gallery: &Gallery,
        device: usize,
    ) -> Result<&'a mut Mirror> {
        let current = match copy.as_mut() {
            Some(mirror) if mirror.ordinal() == device => mirror.follow(gallery),
            _ => Ok(false),
        };
        if !matches!(current, Ok(true)) {
            // free the old copy (or one a failed upload left half-followed) before the new
            *copy = None;
            *copy = Some(Mirror::new(gallery, device)?);
        }
        Ok(copy.as_mut().expect("just made"))
    }

    /// [`Mirror::device_workspace`] of the up-to-date copy on `device`.
    pub fn device_workspace(
        &self,
        gallery: &Gallery,
        device: usize,
        q: usize,
        k: usize,
        filtered: bool,
    ) -> Result<(usize, usize)> {
        let mut copy = self.lock()?;
        Ok(Self::current(&mut copy, gallery, device)?.device_workspace(q, k, filtered))
    }

    /// [`Mirror::search_device`] on the up-to-date copy on `device`, `filter` as for
    /// [`GpuSearch::search`].
    pub fn search_device(
        &self,
        gallery: &Gallery,
        device: usize,
        call: &DeviceQueries,
        filter: Option<IdFilter>,
    ) -> Result<()> {
        let mut copy = self.lock()?;
        let mirror = Self::current(&mut copy, gallery, device)?;
        let mask = filter.map(|f| mirror.device_mask(&gallery.row_mask(f)));
        mirror.search_device(call, mask.as_deref())
    }

    /// Device bytes the copy holds (0 before the first search, and in a forked child,
    /// where the parent's copy is not this process's memory).
    pub fn nbytes(&self) -> usize {
        self.lock()
            .map_or(0, |copy| copy.as_ref().map_or(0, Mirror::nbytes))
    }

    /// The copy, locked; in a child forked from a process that used CUDA, the fork's error
    /// without touching the lock (another thread of the parent may have held it at the fork,
    /// and the copy's device memory belongs to the parent).
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Mirror>>> {
        if super::forked() {
            return Err(super::forked_error());
        }
        Ok(self.copy.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
