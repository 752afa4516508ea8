//! A small seeded generator (SplitMix64): the same seed gives the same requests, so a failure
//! printed with its seed can be replayed with `APEX_FUZZ_SEED=<seed>`.

/// A deterministic pseudo-random generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: i64, high: i64) -> i64 {
        let span = high.wrapping_sub(low) as u64;
        if span == u64::MAX {
            return self.next_u64() as i64;
        }
        low.wrapping_add((self.next_u64() % (span + 1)) as i64)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A short string of printable ASCII, sometimes with awkward characters.
    pub fn text(&mut self, max: usize) -> String {
        const AWKWARD: [&str; 12] = [
            "\u{0}", "\n", "\"", "\\", "é", "日本", "🙂", "\u{202e}", "\u{feff}", "%", "'", "<",
        ];
        let len = self.below(max + 1);
        let mut out = String::with_capacity(len);
        for _ in 0..len {
            if self.chance(10) {
                let awkward = AWKWARD[self.below(AWKWARD.len())];
                out.push_str(awkward);
            } else {
                out.push(char::from(b' ' + self.below(95) as u8));
            }
        }
        out
    }
}
