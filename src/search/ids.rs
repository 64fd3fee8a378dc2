//! The map from a gallery's ids to its rows.

use std::collections::HashMap;

/// Row of each id. Ids are integers the caller chose (or counted up), so the map hashes
/// them with a fast integer mix instead of the DoS-resistant default: an allow-list of
/// 100k ids is 100k lookups per search.
pub type IdMap = HashMap<i64, usize, std::hash::BuildHasherDefault<IdHasher>>;

/// splitmix64's finaliser over an i64 key.
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e3779b97f4a7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_i64(&mut self, i: i64) {
        self.0 = i as u64;
    }
}
