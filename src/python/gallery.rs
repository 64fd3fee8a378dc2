//! `Gallery`: enrolled embeddings behind a lock, searched, identified, saved and loaded.

use super::convert::{detached, run, to_py_err, GalleryFileError};
use crate::search::gallery::{Dtype, Gallery, IdFilter};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The filter of `allow` / `deny` (giving both is an error).
fn id_filter<'a>(
    allow: Option<&'a [i64]>,
    deny: Option<&'a [i64]>,
) -> PyResult<Option<IdFilter<'a>>> {
    match (allow, deny) {
        (Some(_), Some(_)) => Err(pyo3::exceptions::PyValueError::new_err(
            "allow, deny: give one of them, not both",
        )),
        (Some(a), None) => Ok(Some(IdFilter::Allow(a))),
        (None, Some(d)) => Ok(Some(IdFilter::Deny(d))),
        (None, None) => Ok(None),
    }
}

/// An id list as the filter reads it: the array's own memory when it is contiguous.
fn id_list<'a>(ids: &'a PyReadonlyArray1<'_, i64>) -> Cow<'a, [i64]> {
    match ids.as_slice() {
        Ok(slice) => Cow::Borrowed(slice),
        Err(_) => Cow::Owned(ids.as_array().to_vec()),
    }
}

/// The core gallery behind a lock: searches share it, add/remove take it alone. Every call
/// releases the GIL before waiting for the lock, so Python threads never deadlock on it.
#[pyclass(frozen, name = "Gallery", module = "arcface_rs._core")]
pub struct PyGallery {
    gallery: RwLock<Gallery>,
    #[cfg(feature = "cuda")]
    gpu: crate::cuda::gallery::GpuSearch,
}

impl PyGallery {
    fn wrap(gallery: Gallery) -> Self {
        PyGallery {
            gallery: RwLock::new(gallery),
            #[cfg(feature = "cuda")]
            gpu: Default::default(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Gallery> {
        // A panic cannot leave a gallery half-changed (changes are validated first), so a
        // poisoned lock still guards a consistent gallery.
        self.gallery.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The gallery for a change (its journal records it, for the GPU copy).
    fn write(&self) -> RwLockWriteGuard<'_, Gallery> {
        self.gallery.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `work` on the gallery under its read lock, taken without the GIL and outside the
    /// thread pool (see [`detached`]), inside the fork gate (a fork waits for it to end, so
    /// that no child inherits the lock held).
    fn reading<R: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&Gallery) -> R + Send,
    ) -> PyResult<R> {
        detached(py, || {
            let _gate = crate::fork_gate::pass();
            let guard = self.read();
            let gallery: &Gallery = &guard;
            crate::pool::install(|| work(gallery))
        })
    }

    /// `work` on the gallery under its write lock, as [`PyGallery::reading`].
    fn writing<R: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&mut Gallery) -> R + Send,
    ) -> PyResult<R> {
        detached(py, || {
            let _gate = crate::fork_gate::pass();
            let mut guard = self.write();
            let gallery: &mut Gallery = &mut guard;
            crate::pool::install(|| work(gallery))
        })
    }
}

#[pymethods]
impl PyGallery {
    #[new]
    fn new(dim: usize, dtype: &str) -> PyResult<Self> {
        let dtype = Dtype::parse(dtype).map_err(to_py_err)?;
        Ok(PyGallery::wrap(
            Gallery::new(dim, dtype).map_err(to_py_err)?,
        ))
    }

    /// Adds float32 rows (normalised here); returns their int64 ids.
    #[pyo3(signature = (emb, ids=None))]
    fn add<'py>(
        &self,
        py: Python<'py>,
        emb: PyReadonlyArray2<'py, f32>,
        ids: Option<PyReadonlyArray1<'py, i64>>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let emb = emb.as_array();
        let ids = ids.as_ref().map(|i| i.as_array());
        let out = self.writing(py, |g| g.add(emb, ids))?.map_err(to_py_err)?;
        Ok(out.into_pyarray(py))
    }

    /// Removes the rows with these ids (all must be present); returns how many.
    fn remove(&self, py: Python<'_>, ids: PyReadonlyArray1<'_, i64>) -> PyResult<usize> {
        let ids = ids.as_array();
        self.writing(py, |g| g.remove(ids))?.map_err(to_py_err)
    }

    /// (scores float32 (Q, k) best first, ids int64 (Q, k)); -1 / -inf pad when k > len.
    /// `allow` / `deny` (at most one): only these ids / every id but these.
    #[pyo3(signature = (queries, k, allow=None, deny=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        allow: Option<PyReadonlyArray1<'py, i64>>,
        deny: Option<PyReadonlyArray1<'py, i64>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = queries.as_array();
        let (allow, deny) = (allow.as_ref().map(id_list), deny.as_ref().map(id_list));
        let filter = id_filter(allow.as_deref(), deny.as_deref())?;
        let r = self
            .reading(py, |g| g.search_with(q, k, filter))?
            .map_err(to_py_err)?;
        (r.scores.into_pyarray(py), r.indices.into_pyarray(py)).into_pyobject(py)
    }

    /// (lims uint64 (Q + 1,), scores float32, ids int64): every row scoring above
    /// `threshold`, best first, query i's at lims[i]..lims[i + 1].
    fn range_search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        threshold: f32,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = queries.as_array();
        let (lims, scores, ids) = self
            .reading(py, |g| g.range_search(q, threshold))?
            .map_err(to_py_err)?;
        (
            PyArray1::from_vec(py, lims),
            PyArray1::from_vec(py, scores),
            PyArray1::from_vec(py, ids),
        )
            .into_pyobject(py)
    }

    /// The stored vectors of `ids` decoded to float32 (len(ids), dim), in that order.
    fn get<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let ids = ids.as_array().to_vec();
        let out = self.reading(py, |g| g.get(&ids))?.map_err(to_py_err)?;
        Ok(out.into_pyarray(py))
    }

    /// `search` on CUDA device `device` (a copy of the rows stays there and follows the
    /// gallery's adds and removes; `allow` / `deny` as for `search`). k above 1024 runs on the CPU, with the
    /// same results.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    #[pyo3(signature = (queries, k, device, allow=None, deny=None))]
    fn search_cuda<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        device: usize,
        allow: Option<PyReadonlyArray1<'py, i64>>,
        deny: Option<PyReadonlyArray1<'py, i64>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        #[cfg(feature = "cuda")]
        {
            let q = queries.as_array();
            let (allow, deny) = (allow.as_ref().map(id_list), deny.as_ref().map(id_list));
            let filter = id_filter(allow.as_deref(), deny.as_deref())?;
            let r = self
                .reading(py, |gallery| self.gpu.search(gallery, q, k, device, filter))?
                .map_err(to_py_err)?;
            (r.scores.into_pyarray(py), r.indices.into_pyarray(py)).into_pyobject(py)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(super::cuda::no_cuda_feature())
        }
    }

    /// (workspace bytes, k per query) of a search of `q` queries in device memory for `k`
    /// (`filtered`: with an allow/deny filter): what `search_cuda_device` needs. The GPU
    /// copy is brought up to date first.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn search_cuda_workspace(
        &self,
        py: Python<'_>,
        q: usize,
        k: usize,
        device: usize,
        filtered: bool,
    ) -> PyResult<(usize, usize)> {
        #[cfg(feature = "cuda")]
        {
            self.reading(py, |g| self.gpu.device_workspace(g, device, q, k, filtered))?
                .map_err(to_py_err)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(super::cuda::no_cuda_feature())
        }
    }

    /// Queues the search of (q, dim) contiguous float32 `queries` in device memory on
    /// `stream`, into (q, k') float32 `out_scores` and int64 `out_ids` (k' and the workspace
    /// size from `search_cuda_workspace`); device addresses, from arcface_rs's own torch
    /// glue. Nothing is copied to the host.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    #[pyo3(signature = (queries, q, k, device, stream, workspace, workspace_bytes, out_scores, out_ids, allow=None, deny=None))]
    #[allow(clippy::too_many_arguments)]
    fn search_cuda_device(
        &self,
        py: Python<'_>,
        queries: u64,
        q: usize,
        k: usize,
        device: usize,
        stream: u64,
        workspace: u64,
        workspace_bytes: usize,
        out_scores: u64,
        out_ids: u64,
        allow: Option<PyReadonlyArray1<'_, i64>>,
        deny: Option<PyReadonlyArray1<'_, i64>>,
    ) -> PyResult<()> {
        #[cfg(feature = "cuda")]
        {
            if [queries, workspace, out_scores, out_ids].contains(&0) {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "queries, workspace, out_scores, out_ids: device addresses must not be 0",
                ));
            }
            let (allow, deny) = (allow.as_ref().map(id_list), deny.as_ref().map(id_list));
            let filter = id_filter(allow.as_deref(), deny.as_deref())?;
            let call = crate::cuda::gallery::DeviceQueries {
                stream,
                queries,
                q,
                k,
                workspace,
                workspace_bytes,
                out_s: out_scores,
                out_i: out_ids,
            };
            self.reading(py, |g| self.gpu.search_device(g, device, &call, filter))?
                .map_err(to_py_err)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(super::cuda::no_cuda_feature())
        }
    }

    /// (ids int64 (Q,), scores float32 (Q,)): the best id, -1 below the threshold
    /// (`allow` / `deny` as for `search`).
    #[pyo3(signature = (queries, threshold, allow=None, deny=None))]
    fn identify<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        threshold: f32,
        allow: Option<PyReadonlyArray1<'py, i64>>,
        deny: Option<PyReadonlyArray1<'py, i64>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = queries.as_array();
        let (allow, deny) = (allow.as_ref().map(id_list), deny.as_ref().map(id_list));
        let filter = id_filter(allow.as_deref(), deny.as_deref())?;
        let (ids, scores) = self
            .reading(py, |g| g.identify_with(q, threshold, filter))?
            .map_err(to_py_err)?;
        (ids.into_pyarray(py), scores.into_pyarray(py)).into_pyobject(py)
    }

    /// The ids in gallery order.
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, self.read().ids())
    }

    /// The stored rows decoded to float32 unit vectors, in gallery order.
    fn vectors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        Ok(self.reading(py, |g| g.vectors())?.into_pyarray(py))
    }

    /// (ids, vectors) read under one lock: they match even while other threads change the
    /// gallery.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let (ids, vectors) = self.reading(py, |g| (g.ids().to_vec(), g.vectors()))?;
        (PyArray1::from_vec(py, ids), vectors.into_pyarray(py)).into_pyobject(py)
    }

    /// Writes the gallery to `path` (safetensors) atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.reading(py, |g| crate::search::file::save(g, &path))?
            .map_err(to_py_err)
    }

    /// Reads a gallery written by `save`; a damaged file is a ValueError. `mmap`: leave the
    /// vectors in a read-only mapping of the file (copied only when the gallery changes).
    #[staticmethod]
    #[pyo3(signature = (path, mmap=false))]
    fn load(py: Python<'_>, path: PathBuf, mmap: bool) -> PyResult<Self> {
        let g = run(py, || {
            if mmap {
                crate::search::file::load_mapped(&path)
            } else {
                crate::search::file::load(&path)
            }
        })?
        .map_err(to_py_err)?;
        Ok(PyGallery::wrap(g))
    }

    /// The gallery as the bytes of its file (for pickling and copies).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let bytes = self.reading(py, crate::search::file::to_bytes)?;
        Ok(pyo3::types::PyBytes::new(py, &bytes))
    }

    /// A gallery from the bytes of `to_bytes` (checked as a file is: a damaged copy is a
    /// GalleryFileError).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let g = run(py, || crate::search::file::parse(data))?.map_err(|why| {
            GalleryFileError::new_err(format!("data: not a valid arcface_rs gallery: {why}"))
        })?;
        Ok(PyGallery::wrap(g))
    }

    #[getter]
    fn dim(&self) -> usize {
        self.read().dim()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.read().dtype().name()
    }

    /// Bytes held by the stored vectors (and int8 scales).
    #[getter]
    fn nbytes(&self) -> usize {
        self.read().vector_bytes()
    }

    /// Whether the vectors are read from a mapping of the file they were loaded from.
    #[getter]
    fn mapped(&self) -> bool {
        self.read().codes().is_mapped()
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }
}
