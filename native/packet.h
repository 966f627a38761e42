// Raw IPv4/IPv6 + TCP packets as Bumblebee's pump and the on-ramp demultiplexer see them: parsing, tuples,
// checksums and in-place NAT rewrites. Pure functions over a byte buffer, no syscalls, so the same code runs in
// the data plane, the unit tests and the libFuzzer target.
//
// RFCs: 791 (IPv4), 8200 (IPv6), 9293 (TCP, MSS option), 1071 and 1624 (checksums, incremental update).
//
// Every function takes the packet's real length and never reads past it: packets come from other processes and
// are hostile until parsed. Ports and the checksum are kept in host order in the structs and written back in
// network order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace fdferry::packet {

constexpr uint8_t kProtoTcp = 6;
constexpr uint8_t kTcpFin = 0x01;
constexpr uint8_t kTcpSyn = 0x02;
constexpr uint8_t kTcpRst = 0x04;
constexpr uint8_t kTcpAck = 0x10;

// Why a packet was not accepted as a plain TCP segment. Each has a drop counter in the pumps.
enum class Verdict {
  kOk,
  kTruncated,      // shorter than its headers, or than its own length fields say
  kBadVersion,     // neither IPv4 nor IPv6
  kBadHeader,      // IPv4 IHL < 5, TCP data offset < 5, options past the end
  kFragment,       // IPv4 MF set or a fragment offset: never reassembled here
  kNotTcp,         // another protocol, or an IPv6 extension header before TCP
  kBadChecksum,    // IPv4 header or TCP checksum does not verify
};

// Stable names for the verdicts, used as counter names in JS.
inline const char* VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kOk: return "ok";
    case Verdict::kTruncated: return "truncated";
    case Verdict::kBadVersion: return "badVersion";
    case Verdict::kBadHeader: return "badHeader";
    case Verdict::kFragment: return "fragment";
    case Verdict::kNotTcp: return "notTcp";
    case Verdict::kBadChecksum: return "badChecksum";
  }
  return "unknown";
}

// A 16-bit field in network order, read and written.
inline uint16_t Load16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
inline void Store16(uint8_t* p, uint16_t value) {
  p[0] = static_cast<uint8_t>(value >> 8);
  p[1] = static_cast<uint8_t>(value);
}

// A parsed TCP segment: pointers into the caller's buffer, valid as long as it is.
struct TcpSegment {
  uint8_t* ip = nullptr;
  size_t length = 0;        // the IP total length (what goes on the wire; trailing bytes beyond it are ignored)
  int family = 0;           // 4 or 6
  size_t ip_header = 0;     // 20..60 for IPv4, 40 for IPv6
  uint8_t* tcp = nullptr;
  size_t tcp_length = 0;    // TCP header + payload
  size_t tcp_header = 0;    // 20..60
  uint8_t flags = 0;

  // Address bytes (4 or 16) inside the packet.
  uint8_t* src() const { return family == 4 ? ip + 12 : ip + 8; }
  uint8_t* dst() const { return family == 4 ? ip + 16 : ip + 24; }
  size_t address_size() const { return family == 4 ? 4 : 16; }
  uint16_t sport() const { return Load16(tcp); }
  uint16_t dport() const { return Load16(tcp + 2); }
  size_t payload() const { return tcp_length - tcp_header; }
};

// One's-complement sum of `length` bytes starting at an even offset of the packet, not folded. Odd lengths pad
// the last byte with zero (RFC 1071).
inline uint64_t SumBytes(const uint8_t* data, size_t length, uint64_t sum = 0) {
  size_t i = 0;
  for (; i + 1 < length; i += 2) sum += static_cast<uint64_t>(data[i] << 8 | data[i + 1]);
  if (i < length) sum += static_cast<uint64_t>(data[i] << 8);
  return sum;
}

inline uint16_t Fold(uint64_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(sum);
}

// The TCP checksum over the pseudo-header and the segment, as it should be written (0 if the segment verifies
// when its checksum field is included).
inline uint16_t TcpChecksumOf(const TcpSegment& segment) {
  uint64_t sum = SumBytes(segment.src(), segment.address_size());
  sum = SumBytes(segment.dst(), segment.address_size(), sum);
  sum += kProtoTcp;
  sum += segment.tcp_length;
  sum = SumBytes(segment.tcp, segment.tcp_length, sum);
  return static_cast<uint16_t>(~Fold(sum));
}

// Parses `data[0, size)` as one IPv4 or IPv6 packet carrying TCP. `verify_checksums` re-sums the segment (it
// costs a pass over the payload; the kernel would otherwise drop a bad one silently and we could not count it).
inline Verdict ParseTcp(uint8_t* data, size_t size, bool verify_checksums, TcpSegment* out) {
  if (size < 1) return Verdict::kTruncated;
  TcpSegment s;
  s.ip = data;
  int version = data[0] >> 4;
  if (version == 4) {
    if (size < 20) return Verdict::kTruncated;
    s.family = 4;
    s.ip_header = static_cast<size_t>(data[0] & 0x0f) * 4;
    if (s.ip_header < 20) return Verdict::kBadHeader;
    s.length = Load16(data + 2);
    if (s.length < s.ip_header || s.length > size) return Verdict::kTruncated;
    uint16_t fragment = Load16(data + 6);
    if ((fragment & 0x2000) != 0 || (fragment & 0x1fff) != 0) return Verdict::kFragment;
    if (data[9] != kProtoTcp) return Verdict::kNotTcp;
    if (verify_checksums && Fold(SumBytes(data, s.ip_header)) != 0xffff) return Verdict::kBadChecksum;
  } else if (version == 6) {
    if (size < 40) return Verdict::kTruncated;
    s.family = 6;
    s.ip_header = 40;
    s.length = 40 + static_cast<size_t>(Load16(data + 4));
    if (s.length > size) return Verdict::kTruncated;
    // Extension headers (hop-by-hop, routing, fragment...) are not walked: such packets are dropped.
    if (data[6] != kProtoTcp) return Verdict::kNotTcp;
  } else {
    return Verdict::kBadVersion;
  }
  s.tcp = data + s.ip_header;
  s.tcp_length = s.length - s.ip_header;
  if (s.tcp_length < 20) return Verdict::kTruncated;
  s.tcp_header = static_cast<size_t>(s.tcp[12] >> 4) * 4;
  if (s.tcp_header < 20) return Verdict::kBadHeader;
  if (s.tcp_header > s.tcp_length) return Verdict::kTruncated;
  s.flags = s.tcp[13];
  if (verify_checksums && TcpChecksumOf(s) != 0) return Verdict::kBadChecksum;
  *out = s;
  return Verdict::kOk;
}

// RFC 1624 eq. 3 over a run of 16-bit words: `field` holds a checksum in network order; the words at `old_words`
// are replaced by `new_words` (same even length). O(length), never the payload.
inline void AdjustChecksum(uint8_t* field, const uint8_t* old_words, const uint8_t* new_words, size_t length) {
  uint64_t sum = static_cast<uint16_t>(~Load16(field));
  for (size_t i = 0; i + 1 < length; i += 2) {
    sum += static_cast<uint16_t>(~Load16(old_words + i));
    sum += Load16(new_words + i);
  }
  Store16(field, static_cast<uint16_t>(~Fold(sum)));
}

// Replaces an address in place, fixing the IPv4 header checksum and the TCP checksum (its pseudo-header covers
// the addresses) incrementally.
inline void RewriteAddress(TcpSegment& segment, uint8_t* address, const uint8_t* replacement) {
  size_t size = segment.address_size();
  if (std::memcmp(address, replacement, size) == 0) return;
  if (segment.family == 4) AdjustChecksum(segment.ip + 10, address, replacement, size);
  AdjustChecksum(segment.tcp + 16, address, replacement, size);
  std::memcpy(address, replacement, size);
}

inline void RewritePort(TcpSegment& segment, uint8_t* port, uint16_t replacement) {
  uint8_t bytes[2];
  Store16(bytes, replacement);
  AdjustChecksum(segment.tcp + 16, port, bytes, 2);
  std::memcpy(port, bytes, 2);
}

// Source and destination in one call, as both NAT directions use it.
inline void Rewrite(TcpSegment& segment, const uint8_t* src, uint16_t sport, const uint8_t* dst, uint16_t dport) {
  RewriteAddress(segment, segment.src(), src);
  RewriteAddress(segment, segment.dst(), dst);
  RewritePort(segment, segment.tcp, sport);
  RewritePort(segment, segment.tcp + 2, dport);
}

// Lowers the MSS option of a SYN to `limit` when it is larger; returns true if it changed. The option may sit at
// an odd offset, so the checksum delta is applied over the even-aligned 4-byte window around it (counted from
// the start of the TCP header, which is 4-byte aligned within the segment).
inline bool ClampMss(TcpSegment& segment, uint16_t limit) {
  if ((segment.flags & kTcpSyn) == 0 || limit == 0) return false;
  uint8_t* options = segment.tcp + 20;
  size_t length = segment.tcp_header - 20;
  size_t i = 0;
  while (i < length) {
    uint8_t kind = options[i];
    if (kind == 0) break;          // end of options
    if (kind == 1) { i++; continue; }  // no-op
    if (i + 1 >= length) break;
    uint8_t size = options[i + 1];
    if (size < 2 || i + size > length) break;
    if (kind == 2 && size == 4) {
      uint8_t* mss = options + i + 2;
      if (Load16(mss) <= limit) return false;
      size_t offset = static_cast<size_t>(mss - segment.tcp);
      size_t window = offset & ~static_cast<size_t>(1);
      // Three aligned bytes pairs cover the two MSS bytes whatever the parity.
      uint8_t before[4], after[4];
      size_t span = (offset & 1) ? 4 : 2;
      std::memcpy(before, segment.tcp + window, span);
      Store16(mss, limit);
      std::memcpy(after, segment.tcp + window, span);
      AdjustChecksum(segment.tcp + 16, before, after, span);
      return true;
    }
    i += size;
  }
  return false;
}

// A flow's addresses as raw bytes (IPv4 in the first 4), ports in host order.
struct Tuple {
  uint8_t family = 0;
  uint8_t src[16] = {};
  uint8_t dst[16] = {};
  uint16_t sport = 0;
  uint16_t dport = 0;

  static Tuple Of(const TcpSegment& segment) {
    Tuple t;
    t.family = static_cast<uint8_t>(segment.family);
    std::memcpy(t.src, segment.src(), segment.address_size());
    std::memcpy(t.dst, segment.dst(), segment.address_size());
    t.sport = segment.sport();
    t.dport = segment.dport();
    return t;
  }
  // The same flow seen from the other end.
  Tuple Reversed() const {
    Tuple t = *this;
    std::memcpy(t.src, dst, 16);
    std::memcpy(t.dst, src, 16);
    t.sport = dport;
    t.dport = sport;
    return t;
  }
  bool operator==(const Tuple& other) const {
    return family == other.family && sport == other.sport && dport == other.dport &&
           std::memcmp(src, other.src, 16) == 0 && std::memcmp(dst, other.dst, 16) == 0;
  }
};

struct TupleHash {
  size_t operator()(const Tuple& t) const {
    // FNV-1a over the bytes that matter; flows are keyed per on-ramp, not by untrusted tenants in one table.
    uint64_t hash = 1469598103934665603ull;
    auto mix = [&hash](const uint8_t* p, size_t n) {
      for (size_t i = 0; i < n; i++) hash = (hash ^ p[i]) * 1099511628211ull;
    };
    mix(&t.family, 1);
    mix(t.src, 16);
    mix(t.dst, 16);
    uint8_t ports[4] = {static_cast<uint8_t>(t.sport >> 8), static_cast<uint8_t>(t.sport),
                        static_cast<uint8_t>(t.dport >> 8), static_cast<uint8_t>(t.dport)};
    mix(ports, 4);
    return static_cast<size_t>(hash);
  }
};

}  // namespace fdferry::packet
