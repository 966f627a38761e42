// libFuzzer target for native/packet.h, native/ip_packet.h, native/reassembly.h and native/ctnetlink.h: the
// parsers, the fragment reassembly and the NAT rewrites Bumblebee's and Fish's pumps apply to packets that come
// from other processes (hostile until parsed).
//
// Build and run (native/fuzz/build.sh has the flags; test/integration/packet-fuzz.test.ts does both):
//   native/fuzz/build.sh /tmp/packet_fuzzer
//   /tmp/packet_fuzzer -max_len=4096 test/fuzz/packet-corpus          # fuzz (add a scratch dir first to keep finds)
//   /tmp/packet_fuzzer test/fuzz/packet-crashes/crash-...               # replay one input
//
// Each input is used four times:
//  1. As a packet, exactly as a flow socket or the tun delivers it. ParseTcp must stay inside it (the copy has
//     exactly the input's size, so ASan sees any read past it) and agree with itself with and without checksum
//     verification. A parsed packet then goes through the pump's NAT both ways plus ClampMss, with addresses,
//     ports and the MSS limit taken from the bytes after the IP total length (which the parser ignores), or from
//     a hash of the input when there are none.
//  2. As a recipe for a SYN with valid checksums whose TCP options are the fuzzer's bytes, with NOPs in front
//     to put the MSS option at odd and even offsets. This checks the option walk and the checksum window on
//     packets that verify, which random mutation of a real packet rarely keeps.
//  3. As a Fish packet (native/ip_packet.h), both directions, with and without verification: the NAT rewrites
//     (egress source, return destination, the ICMP error translation, a fresh IPv4 ID) keep a verifying packet
//     verifying and the IPv4 header residue unchanged, and the replies Fish builds (admin-prohibited, RST) parse
//     back with valid checksums. The ctnetlink encoder (native/ctnetlink.h) gets the parsed tuple, and its answer
//     reader gets the raw input.
//  4. As fragments (native/reassembly.h): the raw input as a hostile fragment, repeated and shifted into an
//     overlap; and a parsed packet cut into fragments (IPv6: by SplitIpv6) and reassembled in a shuffled order,
//     which must give the packet back. Every fragment is accounted for once (delivered, held, dropped, timed out).
//
// The property that matters: the incremental checksum updates (RFC 1624) give exactly what a full recomputation
// gives, so a packet that verified before the rewrite verifies after it, and rewriting back restores it. Any
// failure calls __builtin_trap(), which libFuzzer reports as a crash and saves.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "ctnetlink.h"
#include "ip_packet.h"
#include "packet.h"
#include "reassembly.h"

namespace {

namespace pk = fdferry::packet;
using pk::TcpSegment;
using pk::Verdict;

#define FUZZ_CHECK(condition)                                                                         \
  do {                                                                                                \
    if (!(condition)) {                                                                               \
      std::fprintf(stderr, "packet_fuzzer: check failed at %s:%d: %s\n", __FILE__, __LINE__, #condition); \
      __builtin_trap();                                                                               \
    }                                                                                                 \
  } while (0)

// A heap copy of exactly `size` bytes: one byte past it is a heap-buffer-overflow for ASan.
struct Exact {
  std::unique_ptr<uint8_t[]> bytes;
  size_t size;
  Exact(const uint8_t* data, size_t n) : bytes(new uint8_t[n]), size(n) {
    if (n) std::memcpy(bytes.get(), data, n);
  }
  uint8_t* get() const { return bytes.get(); }
};

using pk::Load16;

// Settings for one run: bytes from the input while they last, then a generator seeded from the whole input,
// so that every input (a bare seed packet included) gets some rewrite and the fuzzer can steer it by appending.
class Knobs {
 public:
  Knobs(const uint8_t* data, size_t size, uint64_t seed) : data_(data), size_(size), state_(seed | 1) {}
  uint8_t Byte() {
    if (next_ < size_) return data_[next_++];
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return static_cast<uint8_t>(state_ >> 32);
  }
  uint16_t Word() {
    uint16_t high = Byte();
    return static_cast<uint16_t>(high << 8 | Byte());
  }
  void Fill(uint8_t* out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = Byte();
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t next_ = 0;
  uint64_t state_;
};

uint64_t Fnv(const uint8_t* data, size_t size) {
  uint64_t hash = 1469598103934665603ull;
  for (size_t i = 0; i < size; i++) hash = (hash ^ data[i]) * 1099511628211ull;
  return hash;
}

// ---- Checksums recomputed from scratch -----------------------------------------------------------------------

// The folded one's-complement sum of the TCP pseudo-header and segment, checksum field included: 0xffff when
// the segment verifies. An incremental update must leave it exactly as it was, valid or not.
uint16_t TcpResidue(const TcpSegment& s) { return static_cast<uint16_t>(~pk::TcpChecksumOf(s)); }
uint16_t Ipv4Residue(const TcpSegment& s) { return pk::Fold(pk::SumBytes(s.ip, s.ip_header)); }

// What a full computation writes into the checksum field (the field taken as 0).
uint16_t FullTcpChecksum(const TcpSegment& s) {
  uint8_t saved[2] = {s.tcp[16], s.tcp[17]};
  s.tcp[16] = s.tcp[17] = 0;
  uint16_t value = pk::TcpChecksumOf(s);
  s.tcp[16] = saved[0], s.tcp[17] = saved[1];
  return value;
}
uint16_t FullIpv4Checksum(const TcpSegment& s) {
  uint8_t saved[2] = {s.ip[10], s.ip[11]};
  s.ip[10] = s.ip[11] = 0;
  uint16_t value = static_cast<uint16_t>(~pk::Fold(pk::SumBytes(s.ip, s.ip_header)));
  s.ip[10] = saved[0], s.ip[11] = saved[1];
  return value;
}

// Checksum state of a packet, to compare before and after a rewrite.
struct Sums {
  uint16_t tcp_residue = 0, ip_residue = 0;
  bool tcp_exact = false, ip_exact = false;  // the field verifies and is what a full computation writes

  static Sums Of(const TcpSegment& s) {
    Sums sums;
    sums.tcp_residue = TcpResidue(s);
    sums.tcp_exact = sums.tcp_residue == 0xffff && Load16(s.tcp + 16) == FullTcpChecksum(s);
    if (s.family == 4) {
      sums.ip_residue = Ipv4Residue(s);
      sums.ip_exact = sums.ip_residue == 0xffff && Load16(s.ip + 10) == FullIpv4Checksum(s);
    }
    return sums;
  }
};

// After any rewrite: the residues did not move, and a field that was exact still is. (A valid field of 0xffff
// where a full computation gives 0 is the other one's-complement zero; it verifies, and RFC 1624 eq. 3 may keep
// it or turn it into 0, so only the residue is checked for it.)
void CheckSumsKept(const TcpSegment& s, const Sums& before) {
  FUZZ_CHECK(TcpResidue(s) == before.tcp_residue);
  if (before.tcp_exact) FUZZ_CHECK(Load16(s.tcp + 16) == FullTcpChecksum(s));
  if (s.family == 4) {
    FUZZ_CHECK(Ipv4Residue(s) == before.ip_residue);
    if (before.ip_exact) FUZZ_CHECK(Load16(s.ip + 10) == FullIpv4Checksum(s));
  }
}

// ---- Parser invariants --------------------------------------------------------------------------------------

void CheckShape(const TcpSegment& s, const uint8_t* data, size_t size) {
  FUZZ_CHECK(s.ip == data);
  FUZZ_CHECK(s.family == 4 || s.family == 6);
  FUZZ_CHECK(s.family == data[0] >> 4);
  if (s.family == 4) {
    FUZZ_CHECK(s.ip_header >= 20 && s.ip_header <= 60 && s.ip_header % 4 == 0);
    FUZZ_CHECK(s.length == Load16(data + 2));
  } else {
    FUZZ_CHECK(s.ip_header == 40);
    FUZZ_CHECK(s.length == 40u + Load16(data + 4));
  }
  FUZZ_CHECK(s.length <= size);
  FUZZ_CHECK(s.ip_header <= s.length);
  FUZZ_CHECK(s.tcp == data + s.ip_header);
  FUZZ_CHECK(s.ip_header + s.tcp_length == s.length);
  FUZZ_CHECK(s.tcp_header >= 20 && s.tcp_header <= 60 && s.tcp_header % 4 == 0);
  FUZZ_CHECK(s.tcp_header <= s.tcp_length);
  FUZZ_CHECK(s.payload() == s.tcp_length - s.tcp_header);
  FUZZ_CHECK(s.flags == s.tcp[13]);
  FUZZ_CHECK(s.src() + s.address_size() <= s.ip + s.ip_header && s.dst() + s.address_size() <= s.ip + s.ip_header);

  pk::Tuple tuple = pk::Tuple::Of(s);
  FUZZ_CHECK(tuple.family == s.family && tuple.sport == s.sport() && tuple.dport == s.dport());
  FUZZ_CHECK(tuple.Reversed().Reversed() == tuple);
  FUZZ_CHECK(pk::TupleHash{}(tuple.Reversed().Reversed()) == pk::TupleHash{}(tuple));
}

bool SameShape(const TcpSegment& a, const TcpSegment& b) {
  return a.length == b.length && a.family == b.family && a.ip_header == b.ip_header &&
         a.tcp_length == b.tcp_length && a.tcp_header == b.tcp_header && a.flags == b.flags &&
         a.tcp - a.ip == b.tcp - b.ip;
}

// ---- The MSS option walk, written out independently --------------------------------------------------------

// Offset (from the TCP header) of the value of the first well-formed MSS option, or 0: options are walked until
// the end-of-list option, a truncated or malformed length, or the end of the header. Other kinds, and an MSS
// kind with a length other than 4, are skipped by their length.
size_t MssOffset(const TcpSegment& s) {
  size_t at = 20;
  while (at < s.tcp_header) {
    uint8_t kind = s.tcp[at];
    if (kind == 0) return 0;
    if (kind == 1) {
      at += 1;
      continue;
    }
    if (at + 2 > s.tcp_header) return 0;
    size_t length = s.tcp[at + 1];
    if (length < 2 || at + length > s.tcp_header) return 0;
    if (kind == 2 && length == 4) return at + 2;
    at += length;
  }
  return 0;
}

// ClampMss, checked: it changes the MSS value to `limit` exactly when it should, nothing else but the
// checksum field, and keeps the checksums.
bool Clamp(TcpSegment& s, uint16_t limit) {
  size_t offset = MssOffset(s);
  bool expected = (s.flags & pk::kTcpSyn) != 0 && limit != 0 && offset != 0 && Load16(s.tcp + offset) > limit;
  std::vector<uint8_t> before(s.ip, s.ip + s.length);
  Sums sums = Sums::Of(s);

  bool changed = pk::ClampMss(s, limit);

  FUZZ_CHECK(changed == expected);
  size_t tcp_at = s.ip_header;
  for (size_t i = 0; i < s.length; i++) {
    bool checksum = i == tcp_at + 16 || i == tcp_at + 17;
    bool mss = changed && (i == tcp_at + offset || i == tcp_at + offset + 1);
    if (!checksum && !mss) FUZZ_CHECK(s.ip[i] == before[i]);
  }
  if (changed) FUZZ_CHECK(Load16(s.tcp + offset) == limit);
  if (!changed) FUZZ_CHECK(Load16(s.tcp + 16) == Load16(before.data() + tcp_at + 16));
  CheckSumsKept(s, sums);
  return changed;
}

// Rewrite, checked: the tuple is what was asked for, nothing but addresses, ports and checksums moved, and the
// checksums are kept.
void RewriteChecked(TcpSegment& s, const uint8_t* src, uint16_t sport, const uint8_t* dst, uint16_t dport) {
  std::vector<uint8_t> before(s.ip, s.ip + s.length);
  Sums sums = Sums::Of(s);

  pk::Rewrite(s, src, sport, dst, dport);

  size_t n = s.address_size();
  FUZZ_CHECK(std::memcmp(s.src(), src, n) == 0 && std::memcmp(s.dst(), dst, n) == 0);
  FUZZ_CHECK(s.sport() == sport && s.dport() == dport);
  size_t src_at = static_cast<size_t>(s.src() - s.ip), dst_at = static_cast<size_t>(s.dst() - s.ip);
  size_t tcp_at = s.ip_header;
  for (size_t i = 0; i < s.length; i++) {
    bool moved = (i >= src_at && i < src_at + n) || (i >= dst_at && i < dst_at + n) ||
                 (i >= tcp_at && i < tcp_at + 4) || i == tcp_at + 16 || i == tcp_at + 17 ||
                 (s.family == 4 && (i == 10 || i == 11));
    if (!moved) FUZZ_CHECK(s.ip[i] == before[i]);
  }
  CheckSumsKept(s, sums);
}

// Parses the working copy again, as the next hop (the tun, a flow socket) would, and checks it is unchanged in
// shape and, if the original verified, still verifies.
TcpSegment Reparse(uint8_t* data, size_t size, const TcpSegment& expected, bool verified) {
  TcpSegment again;
  FUZZ_CHECK(pk::ParseTcp(data, size, false, &again) == Verdict::kOk);
  FUZZ_CHECK(SameShape(again, expected));
  if (verified) {
    TcpSegment checked;
    FUZZ_CHECK(pk::ParseTcp(data, size, true, &checked) == Verdict::kOk);
  }
  return again;
}

// An address for one end of the NAT: mostly like the pump's (a pool, a listener), sometimes the degenerate
// cases (unchanged, all zeros, all ones, the other end's).
void PickAddress(Knobs& knobs, const TcpSegment& s, uint8_t* out) {
  size_t n = s.address_size();
  std::memset(out, 0, 16);
  switch (knobs.Byte() % 8) {
    case 0: std::memcpy(out, s.src(), n); break;
    case 1: std::memcpy(out, s.dst(), n); break;
    case 2: break;
    case 3: std::memset(out, 0xff, n); break;
    case 4:  // 100.64.0.0/10 or fd00::/8 plus a slot quotient, as InternalOf makes them
      if (n == 4) {
        out[0] = 100, out[1] = static_cast<uint8_t>(64 | (knobs.Byte() & 63)), out[2] = knobs.Byte(), out[3] = knobs.Byte();
      } else {
        out[0] = 0xfd;
        knobs.Fill(out + 12, 4);
      }
      break;
    case 5:  // one bit away from the source
      std::memcpy(out, s.src(), n);
      out[knobs.Byte() % n] ^= static_cast<uint8_t>(1u << (knobs.Byte() % 8));
      break;
    default: knobs.Fill(out, n); break;
  }
}

uint16_t PickPort(Knobs& knobs, uint16_t original) {
  switch (knobs.Byte() % 6) {
    case 0: return original;
    case 1: return 0;
    case 2: return 0xffff;
    case 3: return static_cast<uint16_t>(2000 + knobs.Word() % 60000);  // the pump's internal ports
    default: return knobs.Word();
  }
}

uint16_t PickLimit(Knobs& knobs) {
  switch (knobs.Byte() % 6) {
    case 0: return 0;  // no clamp configured
    case 1: return 536;
    case 2: return 1220;
    case 3: return 1;
    default: return knobs.Word();
  }
}

// The pump on one packet: client -> kernel (ToKernel), the kernel's reply -> client (OnTunReadable), then the
// client packet rewritten back to what it was.
void Nat(uint8_t* data, size_t size, Knobs& knobs, bool verified) {
  TcpSegment s;
  FUZZ_CHECK(pk::ParseTcp(data, size, false, &s) == Verdict::kOk);
  const TcpSegment shape = s;
  const std::vector<uint8_t> original(data, data + s.length);
  const Sums original_sums = Sums::Of(s);
  const pk::Tuple client = pk::Tuple::Of(s);

  uint8_t internal[16], listener[16];
  PickAddress(knobs, s, internal);
  uint16_t internal_port = PickPort(knobs, s.sport());
  PickAddress(knobs, s, listener);
  uint16_t listen_port = PickPort(knobs, s.dport());
  uint16_t limit = PickLimit(knobs);

  // ToKernel: clamp, then src -> the internal tuple, dst -> the listener.
  bool clamped = Clamp(s, limit);  // the pump skips the call for a limit of 0; ClampMss must do nothing then
  size_t mss_at = clamped ? s.ip_header + MssOffset(s) : 0;
  RewriteChecked(s, internal, internal_port, listener, listen_port);
  s = Reparse(data, size, shape, verified);
  pk::Tuple forwarded = pk::Tuple::Of(s);
  bool unchanged = std::memcmp(internal, client.src, 16) == 0 && std::memcmp(listener, client.dst, 16) == 0 &&
                   internal_port == client.sport && listen_port == client.dport;
  FUZZ_CHECK((forwarded == client) == unchanged);
  FUZZ_CHECK((pk::TupleHash{}(forwarded) == pk::TupleHash{}(client)) || !unchanged);

  // The kernel answers on the same flow: listener -> internal. (Turning the packet around is itself a rewrite.)
  RewriteChecked(s, listener, listen_port, internal, internal_port);

  // OnTunReadable: parse unverified, clamp (a no-op now: the MSS is at most the limit), dst -> the client.
  s = Reparse(data, size, shape, verified);
  FUZZ_CHECK(!Clamp(s, limit));
  RewriteChecked(s, client.dst, client.dport, client.src, client.sport);
  s = Reparse(data, size, shape, verified);
  FUZZ_CHECK(pk::Tuple::Of(s) == client.Reversed());

  // And back to the client's own packet: every byte as it was but the clamped MSS, the checksums valid exactly
  // when they were, and identical where they were exact.
  RewriteChecked(s, client.src, client.sport, client.dst, client.dport);
  FUZZ_CHECK(pk::Tuple::Of(s) == client);
  Sums sums = Sums::Of(s);
  FUZZ_CHECK(sums.tcp_residue == original_sums.tcp_residue && sums.ip_residue == original_sums.ip_residue);
  size_t tcp_at = s.ip_header;
  for (size_t i = 0; i < s.length; i++) {
    bool tcp_checksum = i == tcp_at + 16 || i == tcp_at + 17;
    bool ip_checksum = s.family == 4 && (i == 10 || i == 11);
    bool mss = clamped && (i == mss_at || i == mss_at + 1);
    if (mss) continue;
    if (tcp_checksum && !(original_sums.tcp_exact && !clamped)) continue;
    if (ip_checksum && !original_sums.ip_exact) continue;
    FUZZ_CHECK(data[i] == original[i]);
  }
}

// ---- 1. The input as a packet ---------------------------------------------------------------------------------

void FuzzPacket(const uint8_t* input, size_t size) {
  Exact plain(input, size), verified(input, size);
  TcpSegment s, v;
  Verdict plain_verdict = pk::ParseTcp(plain.get(), size, false, &s);
  Verdict verified_verdict = pk::ParseTcp(verified.get(), size, true, &v);
  // Parsing never writes.
  FUZZ_CHECK(size == 0 || (std::memcmp(plain.get(), input, size) == 0 && std::memcmp(verified.get(), input, size) == 0));
  // Verification only adds kBadChecksum. The IPv4 header checksum is checked before the TCP header is looked
  // at, so a packet wrong in both is counted as kBadChecksum when verifying.
  if (plain_verdict != Verdict::kOk) {
    size_t ihl = size ? static_cast<size_t>(input[0] & 0x0f) * 4 : 0;
    bool bad_ip_sum = size && input[0] >> 4 == 4 && ihl >= 20 && ihl <= size && pk::Fold(pk::SumBytes(input, ihl)) != 0xffff;
    FUZZ_CHECK(verified_verdict == plain_verdict ||
               (verified_verdict == Verdict::kBadChecksum && bad_ip_sum &&
                (plain_verdict == Verdict::kTruncated || plain_verdict == Verdict::kBadHeader)));
    FUZZ_CHECK(std::strcmp(pk::VerdictName(plain_verdict), "unknown") != 0);
    FUZZ_CHECK(std::strcmp(pk::VerdictName(verified_verdict), "unknown") != 0);
    return;
  }
  FUZZ_CHECK(verified_verdict == Verdict::kOk || verified_verdict == Verdict::kBadChecksum);
  FUZZ_CHECK(std::strcmp(pk::VerdictName(verified_verdict), "unknown") != 0);
  CheckShape(s, plain.get(), size);
  if (verified_verdict == Verdict::kOk) {
    CheckShape(v, verified.get(), size);
    FUZZ_CHECK(SameShape(s, v));
    FUZZ_CHECK(pk::TcpChecksumOf(v) == 0);
    if (v.family == 4) FUZZ_CHECK(pk::Fold(pk::SumBytes(v.ip, v.ip_header)) == 0xffff);
  } else {
    FUZZ_CHECK(pk::TcpChecksumOf(s) != 0 || (s.family == 4 && Ipv4Residue(s) != 0xffff));
  }

  // Settings from the bytes the parser ignores.
  Knobs knobs(input + s.length, size - s.length, Fnv(input, size));
  Nat(plain.get(), size, knobs, verified_verdict == Verdict::kOk);
  // The trailing bytes are not the rewrite's business.
  FUZZ_CHECK(std::memcmp(plain.get() + s.length, input + s.length, size - s.length) == 0);
}

// ---- 2. The input as a recipe for a valid SYN --------------------------------------------------------------

void FuzzSyn(const uint8_t* input, size_t size) {
  if (size < 4) return;
  Knobs knobs(input, size, Fnv(input, size));
  uint8_t shape = knobs.Byte();
  int family = (shape & 1) ? 6 : 4;
  size_t ip_header = family == 4 ? 20 + 4 * ((shape >> 1) % 3) : 40;  // IPv4 options shift nothing TCP sees
  size_t tcp_header = 20 + 4 * (knobs.Byte() % 11);                   // 0..40 bytes of options
  size_t lead = knobs.Byte() % 4;                                     // NOPs before the planted MSS
  size_t payload = knobs.Byte() % 48;                                 // odd lengths too
  size_t trailing = knobs.Byte() % 4;
  uint8_t flags = knobs.Byte();
  if ((flags & 0xc0) != 0xc0) flags = static_cast<uint8_t>((flags & ~pk::kTcpSyn & 0x3f) | pk::kTcpSyn);
  bool plant = (knobs.Byte() & 3) != 0;

  size_t length = ip_header + tcp_header + payload;
  std::vector<uint8_t> packet(length + trailing);
  uint8_t* ip = packet.data();
  if (family == 4) {
    ip[0] = static_cast<uint8_t>(0x40 | ip_header / 4);
    pk::Store16(ip + 2, static_cast<uint16_t>(length));
    pk::Store16(ip + 4, knobs.Word());
    ip[6] = knobs.Byte() & 0x40;  // DF or nothing: never a fragment
    ip[8] = knobs.Byte();
    ip[9] = pk::kProtoTcp;
    knobs.Fill(ip + 12, 8);
    for (size_t i = 20; i < ip_header; i++) ip[i] = 1;  // IP NOP options
  } else {
    ip[0] = 0x60;
    pk::Store16(ip + 4, static_cast<uint16_t>(length - 40));
    ip[6] = pk::kProtoTcp;
    ip[7] = knobs.Byte();
    knobs.Fill(ip + 8, 32);
  }
  uint8_t* tcp = ip + ip_header;
  knobs.Fill(tcp, 12);
  tcp[12] = static_cast<uint8_t>(tcp_header / 4 << 4);
  tcp[13] = flags;
  knobs.Fill(tcp + 14, 2);
  knobs.Fill(tcp + 18, 2);
  knobs.Fill(tcp + 20, tcp_header - 20);  // options as the fuzzer wrote them...
  size_t options = tcp_header - 20;
  if (plant && lead + 4 <= options) {       // ...or an MSS after 0-3 NOPs: odd offsets for 1 and 3
    std::memset(tcp + 20, 1, lead);
    tcp[20 + lead] = 2, tcp[20 + lead + 1] = 4;
  }
  knobs.Fill(tcp + tcp_header, payload);
  knobs.Fill(ip + length, trailing);

  // Valid checksums, computed in full.
  TcpSegment s;
  FUZZ_CHECK(pk::ParseTcp(ip, length + trailing, false, &s) == Verdict::kOk);
  pk::Store16(tcp + 16, 0);
  pk::Store16(tcp + 16, pk::TcpChecksumOf(s));
  if (family == 4) {
    pk::Store16(ip + 10, 0);
    pk::Store16(ip + 10, static_cast<uint16_t>(~pk::Fold(pk::SumBytes(ip, ip_header))));
  }

  Exact exact(packet.data(), packet.size());
  FUZZ_CHECK(pk::ParseTcp(exact.get(), exact.size, true, &s) == Verdict::kOk);
  CheckShape(s, exact.get(), exact.size);
  if (plant && lead + 4 <= options) FUZZ_CHECK(MssOffset(s) == 20 + lead + 2);
  FUZZ_CHECK(Sums::Of(s).tcp_exact && (family == 6 || Sums::Of(s).ip_exact));
  Nat(exact.get(), exact.size, knobs, true);
}

// ---- 3. The input as a Fish packet ------------------------------------------------------------------------------

namespace fip = fdferry::ip;
namespace fct = fdferry::ctnetlink;

bool Verifies(const fip::Packet& p) {
  if (p.family == 4 && pk::Fold(pk::SumBytes(p.ip, p.ip_header)) != 0xffff) return false;
  return fip::L4ChecksumValid(p);
}

// The IPv4 header's residue: an incremental update must keep it whatever it was.
uint16_t HeaderResidue(const fip::Packet& p) { return p.family == 4 ? pk::Fold(pk::SumBytes(p.ip, p.ip_header)) : 0; }

void CheckFishShape(const fip::Packet& p, const uint8_t* data, size_t size) {
  FUZZ_CHECK(p.ip == data && p.length <= size && p.ip_header <= p.length);
  FUZZ_CHECK(p.l4 == data + p.ip_header && p.ip_header + p.l4_length == p.length);
  FUZZ_CHECK(p.l4_length >= 8);
  if (p.kind == fip::Kind::kTcp) FUZZ_CHECK(p.tcp_header >= 20 && p.tcp_header <= p.l4_length);
  if (p.kind == fip::Kind::kIcmpError) {
    FUZZ_CHECK(p.inner.ip == p.l4 + 8 && p.inner.ip + p.inner.available == data + p.length);
    FUZZ_CHECK(p.inner.l4 + p.inner.l4_available == data + p.length && p.inner.l4_available >= 8);
  }
}

// A built reply: parses (as the client's stack would get it) with valid checksums and the expected shape.
void CheckReply(const fip::Packet& original, const uint8_t* reply, size_t length, bool rst) {
  FUZZ_CHECK(length <= fip::kMaxReply);
  Exact exact(reply, length);
  fip::Packet parsed;
  fip::Verdict verdict = fip::Parse(exact.get(), length, fip::Direction::kReturn, true, &parsed);
  if (rst) {
    FUZZ_CHECK(verdict == fip::Verdict::kOk && parsed.kind == fip::Kind::kTcp);
    FUZZ_CHECK(parsed.tcp_flags() == (pk::kTcpRst | pk::kTcpAck));
    FUZZ_CHECK(parsed.sport() == original.dport() && parsed.dport() == original.sport());
  } else {
    FUZZ_CHECK(length <= (original.family == 4 ? fip::kMaxIcmp4Error : fip::kMaxIcmp6Error));
    // The quote is the client's packet, which may be one the return parser refuses (an echo request quoted as an
    // error is fine; anything else the inner parse accepts too): the outer checksums always verify.
    FUZZ_CHECK(verdict == fip::Verdict::kOk || verdict == fip::Verdict::kProtocol || verdict == fip::Verdict::kTruncated ||
               verdict == fip::Verdict::kFragment || verdict == fip::Verdict::kExtensionHeader || verdict == fip::Verdict::kBadHeader);
    fip::Packet unverified;
    fip::Verdict plain = fip::Parse(exact.get(), length, fip::Direction::kReturn, false, &unverified);
    FUZZ_CHECK(plain == verdict);
    uint64_t sum = pk::SumBytes(exact.get() + (original.family == 4 ? 20 : 40), length - (original.family == 4 ? 20 : 40));
    if (original.family == 6) sum += fip::PseudoSum(exact.get() + 8, exact.get() + 24, 16, fip::kProtoIcmp6, length - 40);
    FUZZ_CHECK(pk::Fold(sum) == 0xffff);
    if (original.family == 4) FUZZ_CHECK(pk::Fold(pk::SumBytes(exact.get(), 20)) == 0xffff);
  }
  FUZZ_CHECK(std::memcmp(exact.get() + (original.family == 4 ? 16 : 24), original.src(), original.address_size()) == 0);
}

void FuzzFish(const uint8_t* input, size_t size) {
  for (fip::Direction direction : {fip::Direction::kEgress, fip::Direction::kReturn}) {
    Exact plain(input, size), verified(input, size);
    fip::Packet p, v;
    fip::Verdict plain_verdict = fip::Parse(plain.get(), size, direction, false, &p);
    fip::Verdict verified_verdict = fip::Parse(verified.get(), size, direction, true, &v);
    FUZZ_CHECK(size == 0 || (std::memcmp(plain.get(), input, size) == 0 && std::memcmp(verified.get(), input, size) == 0));
    FUZZ_CHECK(std::strcmp(fip::VerdictName(plain_verdict), "unknown") != 0);
    FUZZ_CHECK(std::strcmp(fip::VerdictName(verified_verdict), "unknown") != 0);
    if (verified_verdict == fip::Verdict::kOk) FUZZ_CHECK(plain_verdict == fip::Verdict::kOk);
    if (plain_verdict != fip::Verdict::kOk) continue;
    CheckFishShape(p, plain.get(), size);
    bool verifies = Verifies(p);
    FUZZ_CHECK(verifies == (verified_verdict == fip::Verdict::kOk) || verified_verdict != fip::Verdict::kBadChecksum || !verifies);
    if (verified_verdict == fip::Verdict::kOk) FUZZ_CHECK(verifies);

    Knobs knobs(input + p.length, size - p.length, Fnv(input, size) ^ static_cast<uint64_t>(direction));
    uint8_t address[16];
    knobs.Fill(address, 16);
    uint16_t port = knobs.Word();
    uint16_t header_residue = HeaderResidue(p);
    std::vector<uint8_t> before(p.ip, p.ip + p.length);

    if (direction == fip::Direction::kEgress) {
      // The replies are built from the client's packet as it came.
      uint8_t reply[fip::kMaxReply];
      CheckReply(p, reply, fip::BuildAdminProhibited(p, reply), false);
      if (p.kind == fip::Kind::kTcp) CheckReply(p, reply, fip::BuildRst(p, reply), true);

      fct::Tuple tuple;
      tuple.family = p.family;
      tuple.protocol = fip::FlowProtocol(p);
      std::memcpy(tuple.src, address, 16);
      std::memcpy(tuple.dst, p.dst(), p.address_size());
      tuple.sport = port;
      tuple.dport = p.dport();
      fct::Reservation reservation;
      reservation.orig = tuple;
      std::memcpy(reservation.client, p.src(), p.address_size());
      uint8_t message[fct::kMaxMessage];
      size_t length = fct::BuildReservation(message, 1, reservation);
      uint32_t header_length;
      std::memcpy(&header_length, message, 4);
      FUZZ_CHECK(length == header_length && length <= fct::kMaxMessage && length % 4 == 0);
      length = fct::BuildGet(message, 2, tuple);
      FUZZ_CHECK(length <= fct::kMaxMessage && length % 4 == 0);

      fip::RewriteSource(p, address, port);
      FUZZ_CHECK(std::memcmp(p.src(), address, p.address_size()) == 0);
      FUZZ_CHECK(p.sport() == (p.kind == fip::Kind::kTcp || p.kind == fip::Kind::kUdp || p.kind == fip::Kind::kEchoRequest ? port : 0));
      if (p.fragmentable()) fip::SetIpv4Id(p, knobs.Word());
    } else if (p.kind == fip::Kind::kIcmpError) {
      bool inner_header_verified = p.family == 4 && pk::Fold(pk::SumBytes(p.inner.ip, p.inner.ip_header)) == 0xffff;
      fip::RewriteIcmpErrorReturn(p, address, port);
      FUZZ_CHECK(std::memcmp(p.dst(), address, p.address_size()) == 0);
      FUZZ_CHECK(std::memcmp(fip::InnerSrc(p), address, p.address_size()) == 0 && fip::InnerSport(p) == port);
      // The outer ICMP checksum is summed afresh: it always verifies now.
      FUZZ_CHECK(fip::L4ChecksumValid(p));
      if (inner_header_verified) FUZZ_CHECK(pk::Fold(pk::SumBytes(p.inner.ip, p.inner.ip_header)) == 0xffff);
    } else {
      fip::RewriteDestination(p, address, port);
      FUZZ_CHECK(std::memcmp(p.dst(), address, p.address_size()) == 0);
      FUZZ_CHECK(p.dport() == (p.kind == fip::Kind::kTcp || p.kind == fip::Kind::kUdp || p.kind == fip::Kind::kEchoReply ? port : 0));
    }
    // Incremental updates keep the IPv4 header residue, and a verifying packet verifies.
    FUZZ_CHECK(HeaderResidue(p) == header_residue);
    if (verifies) FUZZ_CHECK(Verifies(p));
    // Still the same packet to the parser.
    fip::Packet again;
    FUZZ_CHECK(fip::Parse(plain.get(), size, direction, false, &again) == fip::Verdict::kOk);
    FUZZ_CHECK(again.kind == p.kind && again.length == p.length && again.l4_length == p.l4_length);
    FUZZ_CHECK(std::memcmp(plain.get() + p.length, input + p.length, size - p.length) == 0);
  }

  // The answer reader on arbitrary bytes: it must stay inside them.
  Exact raw(input, size);
  fct::Answer answer;
  fct::ReadAnswer(raw.get(), size, size >= 12 ? static_cast<uint32_t>(input[8]) : 0, &answer);
}

// ---- 4. Fragment reassembly (native/reassembly.h) -------------------------------------------------------------

namespace fra = fdferry::reassembly;

// Every fragment given to a reassembler is accounted for exactly once: in a delivered datagram, held, dropped by
// Add's result, or timed out through the sink.
struct Ledger {
  size_t added = 0, delivered = 0, dropped = 0, timed_out = 0;
  void Check(const fra::Reassembler& r) const { FUZZ_CHECK(added == delivered + dropped + timed_out + r.held()); }
};

// Adds one fragment and books the outcome; `out` (kMaxDatagram bytes at least) may be the fragment's own buffer.
fra::Result AddBooked(fra::Reassembler& r, Ledger& ledger, const uint8_t* data, size_t size, uint32_t scope, int64_t now,
                      uint8_t* out) {
  fra::Result result = r.Add(data, size, scope, now, false, out, fra::kMaxDatagram);
  switch (result.outcome) {
    case fra::Outcome::kInvalid: break;
    case fra::Outcome::kHeld: ledger.added++; break;
    case fra::Outcome::kDropped: ledger.added++; ledger.dropped += result.count; FUZZ_CHECK(result.count >= 1); break;
    case fra::Outcome::kComplete:
      ledger.added++;
      ledger.delivered += result.count;
      FUZZ_CHECK(result.length <= fra::kMaxDatagram && result.count >= 1);
      break;
  }
  ledger.Check(r);
  return result;
}

// Cuts a whole IPv4 packet into fragments of `chunk` payload bytes (a multiple of 8), DF and ID kept.
std::vector<std::vector<uint8_t>> SplitIpv4(const fip::Packet& p, size_t chunk) {
  std::vector<std::vector<uint8_t>> fragments;
  size_t payload = p.length - p.ip_header;
  for (size_t offset = 0; offset < payload; offset += chunk) {
    size_t n = std::min(chunk, payload - offset);
    std::vector<uint8_t> f(p.ip, p.ip + p.ip_header);
    f.insert(f.end(), p.ip + p.ip_header + offset, p.ip + p.ip_header + offset + n);
    pk::Store16(f.data() + 2, static_cast<uint16_t>(p.ip_header + n));
    pk::Store16(f.data() + 6, static_cast<uint16_t>((p.ip[6] & 0x40) << 8 | (offset + n < payload ? 0x2000 : 0) | offset / 8));
    pk::Store16(f.data() + 10, 0);
    pk::Store16(f.data() + 10, static_cast<uint16_t>(~pk::Fold(pk::SumBytes(f.data(), p.ip_header))));
    fragments.push_back(std::move(f));
  }
  return fragments;
}

void FuzzReassembly(const uint8_t* input, size_t size) {
  std::vector<uint8_t> out(fra::kMaxDatagram);
  Knobs knobs(nullptr, 0, Fnv(input, size) ^ 0x5eed);

  // a) The raw input as a fragment (hostile bytes: the parse must stay inside them), then again (a duplicate),
  //    again for another client, then moved on by 8 bytes (an overlap), in a table with small bounds; then
  //    everything times out.
  {
    Ledger ledger;
    fra::Reassembler r({1000, 4, 2, 1 << 16}, [&](uint32_t, fra::Drop drop, size_t count) {
      FUZZ_CHECK(drop == fra::Drop::kTimeout);
      ledger.timed_out += count;
    });
    Exact exact(input, size);
    fip::Packet ignored;
    bool fragment = fra::IsFragment(exact.get(), size);
    // The pump hands a packet over when the parse says kFragment and IsFragment agrees: it is then an IPv4 or
    // IPv6 fragment to ParseFragment too (which may still refuse it as malformed).
    if (fragment && fip::Parse(exact.get(), size, fip::Direction::kReturn, false, &ignored) == fip::Verdict::kFragment) {
      fra::Fragment parsed;
      fip::Verdict verdict = fra::ParseFragment(exact.get(), size, false, &parsed);
      FUZZ_CHECK(verdict != fip::Verdict::kBadVersion && verdict != fip::Verdict::kProtocol);
      if (verdict == fip::Verdict::kOk) FUZZ_CHECK(parsed.data + parsed.length <= exact.get() + size && parsed.length > 0);
    }
    if (fragment) {
      for (uint32_t scope : {1u, 1u, 2u}) AddBooked(r, ledger, exact.get(), size, scope, 0, out.data());
      if (size >= 48) {
        Exact moved(input, size);
        uint8_t* word = moved.get()[0] >> 4 == 4 ? moved.get() + 6 : moved.get() + 42;
        pk::Store16(word, static_cast<uint16_t>(Load16(word) + (moved.get()[0] >> 4 == 4 ? 1 : 8)));
        AddBooked(r, ledger, moved.get(), size, 1, 10, out.data());
      }
      r.Expire(5000);
      ledger.Check(r);
      FUZZ_CHECK(r.entries() == 0 && r.bytes() == 0);
    }
  }

  // b) A whole packet, cut into fragments, fed in an order of the fuzzer's choosing through one buffer that is
  //    also the output: the datagram comes back as it was (IPv4: apart from the flags word and the header checksum,
  //    which is then valid; IPv6 split by SplitIpv6: byte for byte).
  Exact whole(input, size);
  fip::Packet p;
  if (fip::Parse(whole.get(), size, fip::Direction::kEgress, false, &p) != fip::Verdict::kOk) return;
  bool verified = Verifies(p);
  std::vector<std::vector<uint8_t>> fragments;
  if (p.family == 4) {
    fragments = SplitIpv4(p, 16 + 8 * static_cast<size_t>(knobs.Byte()));
  } else {
    std::vector<uint8_t> scratch(65536);
    size_t mtu = 1280 + knobs.Word() % 2000;
    size_t count = fra::SplitIpv6(p.ip, p.length, mtu, static_cast<uint32_t>(knobs.Word()) << 16 | knobs.Word(), scratch.data(),
                                  [&](const uint8_t* fragment, size_t n) {
                                    FUZZ_CHECK(n <= mtu);
                                    fragments.emplace_back(fragment, fragment + n);
                                  });
    FUZZ_CHECK(count == fragments.size() && count >= 1);
  }
  for (size_t i = fragments.size(); i > 1; i--) std::swap(fragments[i - 1], fragments[knobs.Word() % i]);
  bool duplicate = fragments.size() > 1 && (knobs.Byte() & 1) != 0;
  if (duplicate) fragments.insert(fragments.begin() + 1, fragments[0]);
  Ledger ledger;
  fra::Reassembler r({5000, 1024, 256, 4 << 20}, [&](uint32_t, fra::Drop, size_t count) { ledger.timed_out += count; });
  std::vector<uint8_t> slot(fra::kMaxDatagram);
  fra::Result last;
  for (size_t i = 0; i < fragments.size(); i++) {
    std::memcpy(slot.data(), fragments[i].data(), fragments[i].size());
    last = AddBooked(r, ledger, slot.data(), fragments[i].size(), 7, 0, slot.data());
    if (fragments.size() - (duplicate ? 1 : 0) > fra::kMaxPieces) continue;
    FUZZ_CHECK(last.outcome != fra::Outcome::kInvalid);
    if (i + 1 < fragments.size()) FUZZ_CHECK(last.outcome != fra::Outcome::kComplete);
  }
  if (fragments.size() - (duplicate ? 1 : 0) > fra::kMaxPieces) return;
  FUZZ_CHECK(last.outcome == fra::Outcome::kComplete && last.length == p.length);
  FUZZ_CHECK(r.entries() == 0 && r.bytes() == 0 && ledger.dropped == (duplicate ? 1u : 0u));
  if (p.family == 6) {
    FUZZ_CHECK(std::memcmp(slot.data(), p.ip, p.length) == 0);
  } else {
    FUZZ_CHECK(std::memcmp(slot.data(), p.ip, 6) == 0 && std::memcmp(slot.data() + 8, p.ip + 8, 2) == 0);  // ID kept
    FUZZ_CHECK(std::memcmp(slot.data() + 12, p.ip + 12, p.length - 12) == 0);
    FUZZ_CHECK((slot[6] & 0xbf) == 0 && slot[7] == 0 && (slot[6] & 0x40) == (p.ip[6] & 0x40));
    FUZZ_CHECK(pk::Fold(pk::SumBytes(slot.data(), p.ip_header)) == 0xffff);
  }
  Exact rebuilt(slot.data(), last.length);
  fip::Packet again;
  FUZZ_CHECK(fip::Parse(rebuilt.get(), last.length, fip::Direction::kEgress, false, &again) == fip::Verdict::kOk);
  FUZZ_CHECK(again.kind == p.kind && again.length == p.length);
  if (verified) FUZZ_CHECK(Verifies(again));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzPacket(data, size);
  FuzzSyn(data, size);
  FuzzFish(data, size);
  FuzzReassembly(data, size);
  return 0;
}
