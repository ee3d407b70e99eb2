//! Latency histograms: HDR histograms in microseconds, their wire form between worker
//! processes and the parent (V2 serialization, base64 in a JSON string), merging, and the
//! percentile summary every report prints.
//!
//! Each worker records into its own histogram with no locking; the parent merges them, which
//! is exact for HDR histograms of the same configuration (counts are added bucket by bucket).

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// Highest value tracked, in microseconds (10 minutes); larger values are clamped to it.
pub const MAX_MICROS: u64 = 600_000_000;

/// Latencies in microseconds, 3 significant digits (0.1% resolution).
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // 1..=MAX_MICROS with 3 digits is a fixed configuration, never invalid.
        Self(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds"))
    }

    pub fn record_micros(&mut self, micros: u64) {
        self.0.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Records the time from `from_nanos` to `to_nanos` (clock steps give 1 µs, not a panic).
    pub fn record_span(&mut self, from_nanos: u64, to_nanos: u64) {
        self.record_micros(to_nanos.saturating_sub(from_nanos) / 1_000);
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, and values were clamped on record: cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// The wire form: V2 serialization, base64.
    pub fn encode(&self) -> Result<String> {
        let mut bytes = Vec::new();
        V2Serializer::new().serialize(&self.0, &mut bytes).context("serializing histogram")?;
        Ok(STANDARD.encode(bytes))
    }

    pub fn decode(text: &str) -> Result<Self> {
        let bytes = STANDARD.decode(text).context("histogram is not base64")?;
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).context("deserializing histogram")?;
        let mut out = Self::new();
        out.0.add(&h).context("histogram out of range")?;
        Ok(out)
    }

    pub fn summary(&self) -> Summary {
        let q = |p: f64| self.0.value_at_quantile(p) as f64 / 1000.0;
        Summary {
            count: self.0.len(),
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: self.0.max() as f64 / 1000.0,
            mean_ms: self.0.mean() / 1000.0,
        }
    }
}

/// Serialized as its wire form (`encode`), so histograms travel inside JSON lines.
impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.encode().map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Latency::decode(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Percentiles in milliseconds, as reports show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_keeps_every_count() {
        let mut h = Latency::new();
        for v in [1, 5, 250, 1_000, 12_345, 5_000_000] {
            h.record_micros(v);
        }
        let back = Latency::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(back.summary(), h.summary());
    }

    #[test]
    fn merging_equals_recording_into_one() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        let mut all = Latency::new();
        for v in 1..=10_000u64 {
            let micros = v * 37 % 50_000 + 1;
            if v % 3 == 0 { &mut a } else { &mut b }.record_micros(micros);
            all.record_micros(micros);
        }
        let mut merged = Latency::decode(&a.encode().unwrap()).unwrap();
        merged.merge(&Latency::decode(&b.encode().unwrap()).unwrap());
        assert_eq!(merged.len(), 10_000);
        assert_eq!(merged.summary(), all.summary());
    }

    #[test]
    fn clamps_and_spans() {
        let mut h = Latency::new();
        h.record_micros(0);
        h.record_micros(u64::MAX);
        h.record_span(2_000_000, 1_000_000); // clock went backwards
        h.record_span(1_000_000, 3_500_000);
        let s = h.summary();
        assert_eq!(s.count, 4);
        assert!(s.max_ms >= 599_000.0);
        assert!((s.p50_ms - 0.001).abs() < 1e-9);
    }

    #[test]
    fn empty_summary_is_zero() {
        let s = Latency::new().summary();
        assert_eq!(s.count, 0);
        assert_eq!(s.p99_ms, 0.0);
        assert!(Latency::decode("not base64!").is_err());
    }
}
