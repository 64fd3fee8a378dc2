//! Galleries on disk in the safetensors format, readable without arcface_rs.
//!
//! Tensors: `ids` int64 (N,), `vectors` (N, dim), and for int8 galleries `scales` float32
//! (N,) with `vectors * scales[:, None]` the unit rows. float32 and float16 vectors are
//! stored as such; bfloat16 ones as their raw uint16 bits (`safetensors.numpy` has no
//! bfloat16: shift them left by 16 and view as float32). The header's metadata names the
//! format, its version, dim, dtype, the next automatic id and a CRC-32 of the tensor bytes,
//! so a damaged file is refused instead of loaded wrong.
//!
//! Saves are atomic: written to a temporary file beside the target, flushed to disk, then
//! renamed over it, so a crash mid-save leaves the old file intact.

use super::gallery::{Codes, Dtype, Gallery, Store};
use crate::error::{Error, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FORMAT: &str = "arcface_rs.gallery";
const VERSION: u32 = 1;

/// The tensors of a gallery as (name, safetensors dtype, shape, little-endian bytes).
fn tensors(g: &Gallery) -> Tensors {
    fn bytes<T: Copy, const W: usize>(v: &[T], le: impl Fn(T) -> [u8; W]) -> Vec<u8> {
        v.iter().flat_map(|&x| le(x)).collect()
    }
    let (n, d) = (g.len(), g.dim());
    let mut out = vec![("ids", "I64", vec![n], bytes(g.ids(), i64::to_le_bytes))];
    match g.codes() {
        Codes::F32(v) => out.push(("vectors", "F32", vec![n, d], bytes(v, f32::to_le_bytes))),
        Codes::F16(v) => out.push(("vectors", "F16", vec![n, d], bytes(v, u16::to_le_bytes))),
        Codes::BF16(v) => out.push(("vectors", "U16", vec![n, d], bytes(v, u16::to_le_bytes))),
        Codes::I8(v, scales) => {
            out.push(("scales", "F32", vec![n], bytes(scales, f32::to_le_bytes)));
            out.push(("vectors", "I8", vec![n, d], bytes(v, i8::to_le_bytes)));
        }
    }
    out
}

/// The file's bytes in memory (what [`save`] writes, and [`parse`] reads back): for pickling.
pub fn to_bytes(g: &Gallery) -> Vec<u8> {
    let (header, tensors) = encode(g);
    let mut out =
        Vec::with_capacity(8 + header.len() + tensors.iter().map(|t| t.3.len()).sum::<usize>());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, _, _, data) in &tensors {
        out.extend_from_slice(data);
    }
    out
}

type Tensors = Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)>;

/// The padded JSON header and the tensors of `g`.
fn encode(g: &Gallery) -> (Vec<u8>, Tensors) {
    let tensors = tensors(g);
    let mut crc = checksum_start(g.dim(), g.dtype(), g.next_id());
    let mut entries = Vec::new();
    let mut offset = 0;
    for (name, dtype, shape, data) in &tensors {
        crc.update(data);
        let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
        entries.push(format!(
            r#""{name}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{offset},{}]}}"#,
            shape.join(","),
            offset + data.len()
        ));
        offset += data.len();
    }
    let metadata = format!(
        r#""__metadata__":{{"format":"{FORMAT}","version":"{VERSION}","dim":"{}","dtype":"{}","next_id":"{}","crc32":"{:08x}"}}"#,
        g.dim(),
        g.dtype(),
        g.next_id(),
        crc.finalize()
    );
    let mut header = format!("{{{metadata},{}}}", entries.join(",")).into_bytes();
    // Pad to 8 bytes so every tensor stays aligned for readers that map the file.
    header.resize(header.len().next_multiple_of(8), b' ');
    (header, tensors)
}

/// Writes `g` to `path` atomically.
pub fn save(g: &Gallery, path: &Path) -> Result<()> {
    let (header, tensors) = encode(g);
    remove_stale_temporaries(path);
    let tmp = temporary_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        for (_, _, _, data) in &tensors {
            f.write_all(data)?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is synced.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, "cannot save the gallery", &e)
    })
}

/// The checksum covers the metadata that shapes the gallery as well as the tensor bytes.
fn checksum_start(dim: usize, dtype: Dtype, next_id: i64) -> crc32fast::Hasher {
    let mut crc = crc32fast::Hasher::new();
    crc.update(format!("{dim}/{dtype}/{next_id}/").as_bytes());
    crc
}

/// Deletes temporaries of earlier saves to `path` whose process is gone (a save killed
/// mid-write, by SIGKILL say, leaves one as large as the gallery). A temporary of a process
/// that still runs may be a save in progress and is left alone.
fn remove_stale_temporaries(path: &Path) {
    let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name();
        let entry_name = entry_name.to_string_lossy();
        let Some(rest) = entry_name.strip_prefix(&prefix) else {
            continue;
        };
        let Some((pid, counter)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), true) = (
            pid.parse::<u32>(),
            !counter.is_empty() && counter.bytes().all(|b| b.is_ascii_digit()),
        ) else {
            continue;
        };
        if !process_exists(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn process_exists(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        if pid == std::process::id() {
            return true;
        }
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// `path` opened for reading, with its size, when it is a regular file. Anything else is
/// refused before a byte is read: a device such as /dev/zero would be read until memory
/// runs out, and opening a FIFO with no writer blocks forever.
fn open_regular(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let what = match e.kind() {
            std::io::ErrorKind::NotFound => "no gallery file",
            _ => "cannot read",
        };
        Error::io(path, what, &e)
    })?;
    let not_regular = |meta: &std::fs::Metadata| -> Option<Error> {
        if meta.is_file() {
            return None;
        }
        if meta.is_dir() {
            #[cfg(target_os = "linux")]
            let e = std::io::Error::from_raw_os_error(libc::EISDIR);
            #[cfg(not(target_os = "linux"))]
            let e = std::io::Error::other("is a directory");
            return Some(Error::io(path, "cannot read", &e));
        }
        Some(Error::corrupt(
            path,
            "not a regular file (a device, FIFO or socket); a gallery is a file written by save",
        ))
    };
    if let Some(e) = not_regular(&meta) {
        return Err(e);
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Non-blocking, so that a FIFO put in the file's place after the check cannot block the
    // open; the handle's own metadata is checked again below.
    #[cfg(target_os = "linux")]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options
        .open(path)
        .map_err(|e| Error::io(path, "cannot open", &e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot read", &e))?;
    if let Some(e) = not_regular(&meta) {
        return Err(e);
    }
    Ok((file, meta.len()))
}

/// Reads a gallery written by [`save`], checking everything that could make it wrong.
pub fn load(path: &Path) -> Result<Gallery> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    crate::limits::check_memory("path", len as u128, "reading the gallery file")?;
    let len = usize::try_from(len)
        .map_err(|_| Error::out_of_memory("path", "reading the gallery file", len as u128, None))?;
    let mut bytes = Vec::new();
    crate::limits::reserve("path", &mut bytes, len, "reading the gallery file")?;
    // never more than the size the file had when it was checked (it may grow meanwhile)
    file.take(len as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, "cannot read", &e))?;
    parse(&bytes).map_err(|why| Error::corrupt(path, why))
}

/// [`load`] that leaves the vectors in a read-only mapping of the file instead of copying
/// them (they are still checked once, and copied only when the gallery changes). The file
/// must not be changed in place while the gallery is alive; [`save`] never does that (it
/// replaces the file by renaming, and the mapping keeps the old contents).
pub fn load_mapped(path: &Path) -> Result<Gallery> {
    let (file, len) = open_regular(path)?;
    if len < 8 {
        return Err(Error::corrupt(path, "shorter than a safetensors header"));
    }
    // SAFETY: a read-only private mapping; changing the file under it is documented as not
    // allowed (and saves replace files instead of writing into them).
    let map =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map", &e))?;
    let map = Arc::new(map);
    parse_from(&map, Some(&map)).map_err(|why| Error::corrupt(path, why))
}

/// A gallery from the bytes of a file; the error says what is wrong with them.
pub fn parse(bytes: &[u8]) -> std::result::Result<Gallery, String> {
    parse_from(bytes, None)
}

/// The tensor `data` as a store: a window of `map` when `data` lies in it (aligned), else a
/// copy made by `decode`.
fn store<T: Copy>(
    data: &[u8],
    map: Option<&Arc<memmap2::Mmap>>,
    decode: impl Fn(&[u8]) -> Vec<T>,
) -> Store<T> {
    if let Some(map) = map {
        let offset = (data.as_ptr() as usize).wrapping_sub(map.as_ptr() as usize);
        let len = data.len() / std::mem::size_of::<T>();
        if let Some(s) = Store::mapped(Arc::clone(map), offset, len) {
            return s;
        }
    }
    Store::Owned(decode(data))
}

fn parse_from(
    bytes: &[u8],
    map: Option<&Arc<memmap2::Mmap>>,
) -> std::result::Result<Gallery, String> {
    // One parse of the header; it also checks that the tensors tile the data exactly.
    let (header_len, header) = SafeTensors::read_metadata(bytes).map_err(|e| format!("{e:?}"))?;
    let data = &bytes[8 + header_len..];
    let tensor = |name: &str| {
        let info = header.info(name).ok_or(format!("no tensor {name:?}"))?;
        Ok::<_, String>((info, &data[info.data_offsets.0..info.data_offsets.1]))
    };
    let meta = header
        .metadata()
        .as_ref()
        .ok_or("the header has no __metadata__")?;
    let field = |key: &str| {
        meta.get(key)
            .map(String::as_str)
            .ok_or(format!("metadata lacks {key:?}"))
    };
    if field("format")? != FORMAT {
        return Err(format!(
            "metadata format is {:?}, expected {FORMAT:?}",
            field("format")?
        ));
    }
    let version = field("version")?;
    if version != VERSION.to_string() {
        return Err(format!(
            "format version {version:?}; this arcface_rs reads version {VERSION}"
        ));
    }
    let dim: usize = field("dim")?
        .parse()
        .map_err(|_| "metadata dim is not an integer")?;
    let dtype =
        Dtype::parse(field("dtype")?).map_err(|e| format!("metadata dtype {}", e.message))?;
    let next_id: i64 = field("next_id")?
        .parse()
        .map_err(|_| "metadata next_id is not an integer")?;
    let crc: u32 =
        u32::from_str_radix(field("crc32")?, 16).map_err(|_| "metadata crc32 is not hex")?;

    let names = match dtype {
        Dtype::I8 => vec!["ids", "scales", "vectors"],
        _ => vec!["ids", "vectors"],
    };
    let held = header.tensors().len();
    if held != names.len() {
        return Err(format!("holds {held} tensors, expected {names:?}"));
    }
    // The checksum covers the tensors in file order, as they were written.
    let mut tensors = names
        .iter()
        .map(|&n| tensor(n))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    tensors.sort_by_key(|(info, _)| info.data_offsets.0);
    let mut hasher = checksum_start(dim, dtype, next_id);
    for (_, bytes) in &tensors {
        hasher.update(bytes);
    }
    if hasher.finalize() != crc {
        return Err("the CRC-32 of the data does not match the header: the file is damaged".into());
    }

    let get = |name: &str, want: StDtype, shape: &[usize]| {
        let (info, bytes) = tensor(name)?;
        if info.dtype != want || info.shape != shape {
            return Err(format!(
                "tensor {name:?} is {:?} {:?}, expected {want:?} {shape:?}",
                info.dtype, info.shape
            ));
        }
        Ok(bytes)
    };
    let n = *tensor("ids")?
        .0
        .shape
        .first()
        .ok_or("tensor \"ids\" is a scalar")?;
    let ids: Vec<i64> = get("ids", StDtype::I64, &[n])?
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let u16s = |b: &[u8]| -> Vec<u16> {
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let shape = [n, dim];
    let codes = match dtype {
        Dtype::F32 => Codes::F32(store(get("vectors", StDtype::F32, &shape)?, map, f32s)),
        Dtype::F16 => Codes::F16(store(get("vectors", StDtype::F16, &shape)?, map, u16s)),
        Dtype::BF16 => Codes::BF16(store(get("vectors", StDtype::U16, &shape)?, map, u16s)),
        Dtype::I8 => Codes::I8(
            store(get("vectors", StDtype::I8, &shape)?, map, |b| {
                b.iter().map(|&x| x as i8).collect()
            }),
            f32s(get("scales", StDtype::F32, &[n])?),
        ),
    };
    let mut g = Gallery::from_parts(dim, codes, ids).map_err(|e| e.to_string())?;
    g.set_next_id(next_id);
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn gallery(dtype: Dtype) -> Gallery {
        let emb = Array2::from_shape_fn((40, 9), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 4.5);
        let mut g = Gallery::new(9, dtype).unwrap();
        g.add(emb.view(), None).unwrap();
        g
    }

    #[test]
    fn round_trip_and_damage_is_refused() {
        let dir = std::env::temp_dir().join(format!("afr-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I8] {
            let g = gallery(dtype);
            let path = dir.join(format!("{dtype}.safetensors"));
            save(&g, &path).unwrap();
            let back = load(&path).unwrap();
            assert_eq!(back.codes(), g.codes());
            assert_eq!(back.ids(), g.ids());
            assert_eq!(back.next_id(), g.next_id());
            let bytes = std::fs::read(&path).unwrap();
            for cut in [0, 7, 8, 100, bytes.len() - 1] {
                assert!(parse(&bytes[..cut]).is_err(), "{dtype} cut at {cut}");
            }
            // Every single-byte change is either refused or harmless (header whitespace).
            for at in (0..bytes.len()).step_by(3) {
                let mut bad = bytes.clone();
                bad[at] ^= 0x5a;
                if let Ok(h) = parse(&bad) {
                    assert_eq!(h.codes(), g.codes(), "{dtype} byte {at}");
                    assert_eq!(h.ids(), g.ids(), "{dtype} byte {at}");
                    assert_eq!(h.next_id(), g.next_id(), "{dtype} byte {at}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mapped_load_reads_the_file_in_place_and_copies_on_change() {
        let dir = std::env::temp_dir().join(format!("afr-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I8] {
            let g = gallery(dtype);
            let path = dir.join(format!("{dtype}.safetensors"));
            save(&g, &path).unwrap();
            let mut mapped = load_mapped(&path).unwrap();
            assert!(mapped.codes().is_mapped(), "{dtype}");
            assert_eq!(mapped.codes(), g.codes());
            // replacing the file (as save does) leaves the mapped gallery as it was
            save(&gallery(dtype), &path).unwrap();
            let emb = ndarray::Array2::from_elem((1, 9), 1.0f32);
            mapped.add(emb.view(), None).unwrap();
            assert!(!mapped.codes().is_mapped());
            assert_eq!(mapped.len(), g.len() + 1);
            assert_eq!(load(&path).unwrap().codes(), g.codes());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
