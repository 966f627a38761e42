// Raw IPv4/IPv6 packets as Fish's pump sees them: TCP, UDP, ICMP echo and the ICMP errors that quote them.
// Parsing, the NAT rewrites of both directions with incremental checksums, and the replies Fish makes itself
// (ICMP administratively prohibited, TCP RST). Pure functions over a byte buffer, no syscalls, so the same code
// runs in the data plane and in the libFuzzer target (native/fuzz/).
//
// RFCs: 791, 792 (IPv4, ICMP), 8200, 4443 (IPv6, ICMPv6), 768 (UDP), 9293 (TCP), 1071 and 1624 (checksums,
// incremental update), 1812 §4.3.2.3 and 4443 §2.4 (how much of the offending packet an ICMP error quotes),
// 5508 (NAT of ICMP errors). Recipe: notes/fish-kernel.md §4-5.
//
// Every function takes the packet's real length and never reads past it: packets come from other processes
// (and from the network, through the tun) and are hostile until parsed. Checksums are always adjusted, never
// recomputed from scratch, except the ICMP error's outer checksum (its quoted bytes change in several places):
// recomputing would launder a corrupted client packet into a valid one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "packet.h"

namespace fdferry::ip {

using packet::AdjustChecksum;
using packet::Fold;
using packet::kProtoTcp;
using packet::Load16;
using packet::Store16;
using packet::SumBytes;

constexpr uint8_t kProtoIcmp = 1;
constexpr uint8_t kProtoUdp = 17;
constexpr uint8_t kProtoIcmp6 = 58;

// Why a packet was not accepted. Each has a drop counter named by VerdictName. Not packet::Verdict: this parser
// takes UDP and ICMP too and reassembles fragments, so its verdicts (and the counter names JS sees) differ.
enum class Verdict {
  kOk,
  kTruncated,        // shorter than its headers, or than its own length fields say
  kBadVersion,       // neither IPv4 nor IPv6
  kBadHeader,        // IPv4 IHL < 5, TCP data offset < 5, a UDP length that disagrees with the IP length...
  kFragment,         // an IPv4 or IPv6 fragment: the pump reassembles it (reassembly.h); an ICMP error quoting
                     // a non-first fragment (no ports quoted) stays a drop
  kProtocol,         // not TCP, UDP, ICMP echo or a supported ICMP error (or not expected in this direction)
  kBadChecksum,      // IPv4 header or L4 checksum does not verify (only when verifying)
  kIcmpError,        // a client sent an ICMP error toward the network: Fish has no tuple to translate it by
  kExtensionHeader,  // an IPv6 extension header other than Fragment: not walked
};

// Stable names for the verdicts, used as counter names in JS.
inline const char* VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kOk: return "ok";
    case Verdict::kTruncated: return "truncated";
    case Verdict::kBadVersion: return "badVersion";
    case Verdict::kBadHeader: return "badHeader";
    case Verdict::kFragment: return "fragment";
    case Verdict::kProtocol: return "protocol";
    case Verdict::kBadChecksum: return "badChecksum";
    case Verdict::kIcmpError: return "icmpError";
    case Verdict::kExtensionHeader: return "extensionHeader";
  }
  return "unknown";
}

// Which way a packet travels: egress packets come from a client, return packets from the tun. They accept
// different ICMP: a client may send echo requests only; the network sends echo replies and errors.
enum class Direction { kEgress, kReturn };

// What a packet carries, as far as the NAT cares.
enum class Kind : uint8_t {
  kTcp,
  kUdp,
  kEchoRequest,  // ICMP 8 / ICMPv6 128: the echo id plays the source port
  kEchoReply,    // ICMP 0 / ICMPv6 129: the echo id plays the destination port
  kIcmpError,    // ICMP 3, 11 / ICMPv6 1, 2, 3: quotes a packet of ours, whose tuple is `inner`
};

// The quoted packet inside an ICMP error: a packet Fish sent (E:eport -> remote), as far as it was quoted.
struct Inner {
  uint8_t* ip = nullptr;
  size_t available = 0;   // quoted bytes, from ip to the end of the outer packet
  size_t ip_header = 0;
  uint8_t protocol = 0;   // kProtoTcp, kProtoUdp, or kProtoIcmp/kProtoIcmp6 (then an echo request)
  uint8_t* l4 = nullptr;
  size_t l4_available = 0;
};

// A parsed packet: pointers into the caller's buffer, valid as long as it is.
struct Packet {
  uint8_t* ip = nullptr;
  size_t length = 0;       // the IP total length; bytes beyond it are ignored
  int family = 0;          // 4 or 6
  size_t ip_header = 0;    // 20..60 for IPv4, 40 for IPv6
  uint8_t protocol = 0;    // the IP protocol / next header
  Kind kind = Kind::kTcp;
  uint8_t* l4 = nullptr;
  size_t l4_length = 0;
  size_t tcp_header = 0;   // for TCP: 20..60
  Inner inner;             // for kIcmpError

  size_t address_size() const { return family == 4 ? 4 : 16; }
  uint8_t* src() const { return family == 4 ? ip + 12 : ip + 8; }
  uint8_t* dst() const { return family == 4 ? ip + 16 : ip + 24; }
  bool is_icmp() const { return protocol == kProtoIcmp || protocol == kProtoIcmp6; }
  // Ports as the tuple sees them: for ICMP echo the id is the client's (request) or Fish's (reply) "port", and
  // the remote side's is 0, so echo flows fit the same five-tuple tables.
  uint16_t sport() const {
    if (kind == Kind::kTcp || kind == Kind::kUdp) return Load16(l4);
    return kind == Kind::kEchoRequest ? Load16(l4 + 4) : 0;
  }
  uint16_t dport() const {
    if (kind == Kind::kTcp || kind == Kind::kUdp) return Load16(l4 + 2);
    return kind == Kind::kEchoReply ? Load16(l4 + 4) : 0;
  }
  uint8_t tcp_flags() const { return kind == Kind::kTcp ? l4[13] : 0; }
  size_t payload() const { return kind == Kind::kTcp ? l4_length - tcp_header : l4_length - 8; }
  // IPv4 without DF: the ID matters to reassembly at the destination.
  bool fragmentable() const { return family == 4 && (ip[6] & 0x40) == 0; }

  // The view packet.h's TCP helpers (MSS clamp) take.
  packet::TcpSegment AsTcp() const {
    packet::TcpSegment s;
    s.ip = ip;
    s.length = length;
    s.family = family;
    s.ip_header = ip_header;
    s.tcp = l4;
    s.tcp_length = l4_length;
    s.tcp_header = tcp_header;
    s.flags = l4[13];
    return s;
  }
};

// The pseudo-header sum of TCP, UDP and ICMPv6 (RFC 768, 8200 §8.1), not folded.
inline uint64_t PseudoSum(const uint8_t* src, const uint8_t* dst, size_t address_size, uint8_t protocol,
                          size_t length) {
  uint64_t sum = SumBytes(src, address_size);
  sum = SumBytes(dst, address_size, sum);
  return sum + protocol + (length >> 16) + (length & 0xffff);
}

// The L4 checksum of a parsed packet verifies (UDP over IPv4 with checksum 0 has none and verifies).
inline bool L4ChecksumValid(const Packet& p) {
  if (p.protocol == kProtoUdp && p.family == 4 && Load16(p.l4 + 6) == 0) return true;
  uint64_t sum = SumBytes(p.l4, p.l4_length);
  if (p.protocol != kProtoIcmp) sum += PseudoSum(p.src(), p.dst(), p.address_size(), p.protocol, p.l4_length);
  return Fold(sum) == 0xffff;
}

namespace detail {

// IPv6 next-header values that are extension headers (RFC 8200 §4, IANA), apart from Fragment (44).
inline bool IsExtensionHeader(uint8_t next) {
  switch (next) {
    case 0: case 43: case 50: case 51: case 60: case 135: case 139: case 140: case 253: case 254: return true;
  }
  return false;
}

// The quoted packet of an ICMP error: a full IP header (it names the tuple) and at least the 8 bytes that hold
// the ports or the echo id; anything past that is optional. Only a packet Fish could have sent qualifies.
inline Verdict ParseInner(uint8_t* data, size_t size, int family, Inner* out) {
  Inner in;
  in.ip = data;
  in.available = size;
  if (size < 1) return Verdict::kTruncated;
  if ((data[0] >> 4) != family) return Verdict::kBadVersion;
  if (family == 4) {
    if (size < 20) return Verdict::kTruncated;
    in.ip_header = static_cast<size_t>(data[0] & 0x0f) * 4;
    if (in.ip_header < 20) return Verdict::kBadHeader;
    if (in.ip_header > size) return Verdict::kTruncated;
    if ((Load16(data + 6) & 0x1fff) != 0) return Verdict::kFragment;  // a later fragment: no ports quoted
    in.protocol = data[9];
  } else {
    if (size < 40) return Verdict::kTruncated;
    in.ip_header = 40;
    in.protocol = data[6];
    if (in.protocol == 44) return Verdict::kFragment;
    if (IsExtensionHeader(in.protocol)) return Verdict::kExtensionHeader;
  }
  in.l4 = data + in.ip_header;
  in.l4_available = size - in.ip_header;
  if (in.l4_available < 8) return Verdict::kTruncated;
  uint8_t echo_request = family == 4 ? 8 : 128;
  uint8_t icmp = family == 4 ? kProtoIcmp : kProtoIcmp6;
  if (in.protocol == icmp) {
    if (in.l4[0] != echo_request) return Verdict::kProtocol;
  } else if (in.protocol != kProtoTcp && in.protocol != kProtoUdp) {
    return Verdict::kProtocol;
  }
  *out = in;
  return Verdict::kOk;
}

}  // namespace detail

// Parses `data[0, size)` as one IPv4 or IPv6 packet. `verify_checksums` re-sums the L4 message (a pass over
// the payload) and the IPv4 header, so corrupt packets are counted rather than forwarded.
inline Verdict Parse(uint8_t* data, size_t size, Direction direction, bool verify_checksums, Packet* out) {
  if (size < 1) return Verdict::kTruncated;
  Packet p;
  p.ip = data;
  int version = data[0] >> 4;
  if (version == 4) {
    if (size < 20) return Verdict::kTruncated;
    p.family = 4;
    p.ip_header = static_cast<size_t>(data[0] & 0x0f) * 4;
    if (p.ip_header < 20) return Verdict::kBadHeader;
    p.length = Load16(data + 2);
    if (p.length < p.ip_header || p.length > size) return Verdict::kTruncated;
    // Fragments carry no ports past the first: the caller reassembles them (reassembly.h) and parses the whole.
    uint16_t fragment = Load16(data + 6);
    if ((fragment & 0x2000) != 0 || (fragment & 0x1fff) != 0) return Verdict::kFragment;
    if (verify_checksums && Fold(SumBytes(data, p.ip_header)) != 0xffff) return Verdict::kBadChecksum;
    p.protocol = data[9];
  } else if (version == 6) {
    if (size < 40) return Verdict::kTruncated;
    p.family = 6;
    p.ip_header = 40;
    p.length = 40 + static_cast<size_t>(Load16(data + 4));
    if (p.length > size) return Verdict::kTruncated;
    p.protocol = data[6];
    if (p.protocol == 44) return Verdict::kFragment;
    if (detail::IsExtensionHeader(p.protocol)) return Verdict::kExtensionHeader;
  } else {
    return Verdict::kBadVersion;
  }
  p.l4 = data + p.ip_header;
  p.l4_length = p.length - p.ip_header;
  uint8_t icmp = p.family == 4 ? kProtoIcmp : kProtoIcmp6;
  if (p.protocol == kProtoTcp) {
    p.kind = Kind::kTcp;
    if (p.l4_length < 20) return Verdict::kTruncated;
    p.tcp_header = static_cast<size_t>(p.l4[12] >> 4) * 4;
    if (p.tcp_header < 20) return Verdict::kBadHeader;
    if (p.tcp_header > p.l4_length) return Verdict::kTruncated;
  } else if (p.protocol == kProtoUdp) {
    p.kind = Kind::kUdp;
    if (p.l4_length < 8) return Verdict::kTruncated;
    // The UDP length must agree with the IP length: a shorter one would leave bytes the checksum does not cover
    // travelling through the NAT.
    if (Load16(p.l4 + 4) != p.l4_length) return Verdict::kBadHeader;
  } else if (p.protocol == icmp) {
    if (p.l4_length < 8) return Verdict::kTruncated;
    uint8_t type = p.l4[0];
    bool error = p.family == 4 ? (type == 3 || type == 11) : (type >= 1 && type <= 3);
    bool error_like = p.family == 4 ? (type == 4 || type == 5 || type == 12) : (type == 4);
    if (type == (p.family == 4 ? 8 : 128)) {
      p.kind = Kind::kEchoRequest;
      if (direction != Direction::kEgress) return Verdict::kProtocol;
    } else if (type == (p.family == 4 ? 0 : 129)) {
      p.kind = Kind::kEchoReply;
      if (direction != Direction::kReturn) return Verdict::kProtocol;
    } else if (error || error_like) {
      if (direction == Direction::kEgress) return Verdict::kIcmpError;
      if (!error) return Verdict::kProtocol;
      p.kind = Kind::kIcmpError;
    } else {
      return Verdict::kProtocol;
    }
  } else {
    return Verdict::kProtocol;
  }
  if (verify_checksums && !L4ChecksumValid(p)) return Verdict::kBadChecksum;
  if (p.kind == Kind::kIcmpError) {
    Verdict inner = detail::ParseInner(p.l4 + 8, p.l4_length - 8, p.family, &p.inner);
    if (inner != Verdict::kOk) return inner;
  }
  *out = p;
  return Verdict::kOk;
}

namespace detail {

// Where the L4 checksum sits, or nullptr if the protocol has none that covers the addresses (ICMPv4), or it is
// switched off (IPv4 UDP with checksum 0: it stays 0).
inline uint8_t* PseudoCovered(const Packet& p) {
  switch (p.protocol) {
    case kProtoTcp: return p.l4 + 16;
    case kProtoUdp: return p.family == 4 && Load16(p.l4 + 6) == 0 ? nullptr : p.l4 + 6;
    case kProtoIcmp6: return p.l4 + 2;
    default: return nullptr;
  }
}

// A computed UDP checksum of 0 is sent as 0xffff: 0 means "no checksum" (RFC 768).
inline void FixUdpZero(const Packet& p, uint8_t* field) {
  if (p.protocol == kProtoUdp && field != nullptr && Load16(field) == 0) Store16(field, 0xffff);
}

inline void ReplaceAddress(const Packet& p, uint8_t* address, const uint8_t* replacement) {
  size_t n = p.address_size();
  if (std::memcmp(address, replacement, n) == 0) return;
  if (p.family == 4) AdjustChecksum(p.ip + 10, address, replacement, n);
  uint8_t* field = PseudoCovered(p);
  if (field != nullptr) {
    AdjustChecksum(field, address, replacement, n);
    FixUdpZero(p, field);
  }
  std::memcpy(address, replacement, n);
}

// The word at `at` (a port or the echo id) becomes `value`; the L4 checksum covers it for every protocol.
inline void ReplaceWord(const Packet& p, uint8_t* at, uint16_t value) {
  uint8_t bytes[2];
  Store16(bytes, value);
  uint8_t* field = p.protocol == kProtoTcp ? p.l4 + 16 : p.protocol == kProtoUdp ? PseudoCovered(p) : p.l4 + 2;
  if (field != nullptr) {
    AdjustChecksum(field, at, bytes, 2);
    FixUdpZero(p, field);
  }
  std::memcpy(at, bytes, 2);
}

}  // namespace detail

// Egress: source address and port (the echo id of a request) become Fish's egress tuple.
inline void RewriteSource(Packet& p, const uint8_t* address, uint16_t port) {
  detail::ReplaceAddress(p, p.src(), address);
  if (p.kind == Kind::kTcp || p.kind == Kind::kUdp) {
    detail::ReplaceWord(p, p.l4, port);
  } else if (p.kind == Kind::kEchoRequest) {
    detail::ReplaceWord(p, p.l4 + 4, port);
  }
}

// Return: destination address and port (the echo id of a reply) become the client's.
inline void RewriteDestination(Packet& p, const uint8_t* address, uint16_t port) {
  detail::ReplaceAddress(p, p.dst(), address);
  if (p.kind == Kind::kTcp || p.kind == Kind::kUdp) {
    detail::ReplaceWord(p, p.l4 + 2, port);
  } else if (p.kind == Kind::kEchoReply) {
    detail::ReplaceWord(p, p.l4 + 4, port);
  }
}

// Gives an IPv4 packet a new identification (fixing the header checksum). Every DF=0 packet gets one: all
// clients share the egress address, and two clients' equal IDs would corrupt reassembly at the destination.
inline void SetIpv4Id(Packet& p, uint16_t id) {
  if (p.family != 4) return;
  uint8_t bytes[2];
  Store16(bytes, id);
  AdjustChecksum(p.ip + 10, p.ip + 4, bytes, 2);
  std::memcpy(p.ip + 4, bytes, 2);
}

// The tuple of the quoted packet of an ICMP error, as Fish sent it: E:eport -> remote:rport (rport 0 for echo).
inline uint8_t* InnerSrc(const Packet& p) { return p.family == 4 ? p.inner.ip + 12 : p.inner.ip + 8; }
inline uint8_t* InnerDst(const Packet& p) { return p.family == 4 ? p.inner.ip + 16 : p.inner.ip + 24; }
inline uint16_t InnerSport(const Packet& p) {
  return p.inner.protocol == kProtoTcp || p.inner.protocol == kProtoUdp ? Load16(p.inner.l4) : Load16(p.inner.l4 + 4);
}
inline uint16_t InnerDport(const Packet& p) {
  return p.inner.protocol == kProtoTcp || p.inner.protocol == kProtoUdp ? Load16(p.inner.l4 + 2) : 0;
}
// The protocol as the mapping tables name it (ICMPv6 echo flows are kept under kProtoIcmp too).
inline uint8_t InnerFlowProtocol(const Packet& p) {
  return p.inner.protocol == kProtoIcmp6 ? kProtoIcmp : p.inner.protocol;
}
inline uint8_t FlowProtocol(const Packet& p) { return p.protocol == kProtoIcmp6 ? kProtoIcmp : p.protocol; }

// Return path of an ICMP error about a packet Fish sent (RFC 5508 §4.2): the quoted source (E:eport) becomes
// the client's address and port, with the quoted IPv4 header checksum and the quoted L4 checksum (when it was
// quoted: UDP at +6, TCP at +16, ICMP echo at +2) adjusted; the outer destination becomes the client; the
// ICMP checksum is then summed afresh over the message (ICMPv6: with the pseudo-header), since both the quoted
// bytes and, for ICMPv6, the outer address changed.
inline void RewriteIcmpErrorReturn(Packet& p, const uint8_t* client, uint16_t client_port) {
  Inner& in = p.inner;
  size_t n = p.address_size();
  uint8_t* inner_src = InnerSrc(p);
  uint8_t* port = in.protocol == kProtoTcp || in.protocol == kProtoUdp ? in.l4 : in.l4 + 4;
  uint8_t* l4_sum = nullptr;
  bool pseudo = true;
  if (in.protocol == kProtoTcp) {
    if (in.l4_available >= 18) l4_sum = in.l4 + 16;
  } else if (in.protocol == kProtoUdp) {
    // A quoted UDP checksum of 0 (IPv4) means none, and stays 0.
    if (in.l4_available >= 8 && !(p.family == 4 && Load16(in.l4 + 6) == 0)) l4_sum = in.l4 + 6;
  } else {
    l4_sum = in.l4 + 2;
    pseudo = in.protocol == kProtoIcmp6;
  }
  if (std::memcmp(inner_src, client, n) != 0) {
    if (p.family == 4) AdjustChecksum(in.ip + 10, inner_src, client, n);
    if (l4_sum != nullptr && pseudo) AdjustChecksum(l4_sum, inner_src, client, n);
    std::memcpy(inner_src, client, n);
  }
  uint8_t bytes[2];
  Store16(bytes, client_port);
  if (l4_sum != nullptr) AdjustChecksum(l4_sum, port, bytes, 2);
  std::memcpy(port, bytes, 2);
  if (l4_sum != nullptr && in.protocol == kProtoUdp && Load16(l4_sum) == 0) Store16(l4_sum, 0xffff);

  uint8_t* dst = p.dst();
  if (std::memcmp(dst, client, n) != 0) {
    if (p.family == 4) AdjustChecksum(p.ip + 10, dst, client, n);
    std::memcpy(dst, client, n);
  }
  Store16(p.l4 + 2, 0);
  uint64_t sum = SumBytes(p.l4, p.l4_length);
  if (p.protocol == kProtoIcmp6) sum += PseudoSum(p.src(), p.dst(), n, kProtoIcmp6, p.l4_length);
  Store16(p.l4 + 2, static_cast<uint16_t>(~Fold(sum)));
}

// Largest ICMP errors Fish builds, as RFC 1812 (576 bytes, less a margin: 548) and RFC 4443 (1280, less a
// margin: 1232) bound them.
constexpr size_t kMaxIcmp4Error = 548;
constexpr size_t kMaxIcmp6Error = 1232;
// Enough for either reply Fish builds.
constexpr size_t kMaxReply = kMaxIcmp6Error;

namespace detail {

inline size_t WriteIpHeader(uint8_t* out, int family, uint8_t protocol, const uint8_t* src, const uint8_t* dst,
                            size_t payload) {
  if (family == 4) {
    std::memset(out, 0, 20);
    out[0] = 0x45;
    Store16(out + 2, static_cast<uint16_t>(20 + payload));
    out[6] = 0x40;  // DF: nothing Fish makes should be fragmented on its way to the client
    out[8] = 64;
    out[9] = protocol;
    std::memcpy(out + 12, src, 4);
    std::memcpy(out + 16, dst, 4);
    Store16(out + 10, static_cast<uint16_t>(~Fold(SumBytes(out, 20))));
    return 20;
  }
  std::memset(out, 0, 40);
  out[0] = 0x60;
  Store16(out + 4, static_cast<uint16_t>(payload));
  out[6] = protocol;
  out[7] = 64;
  std::memcpy(out + 8, src, 16);
  std::memcpy(out + 24, dst, 16);
  return 40;
}

}  // namespace detail

// Writes into `out` (kMaxReply bytes at least) an ICMP destination unreachable, administratively prohibited
// (ICMP 3/13, ICMPv6 1/1) from the packet's destination to its source, quoting the packet as far as the size
// bound allows (always its IP header and 8 bytes beyond: the parse guarantees them). Returns the length.
inline size_t BuildAdminProhibited(const Packet& p, uint8_t* out) {
  size_t n = p.address_size();
  size_t header = p.family == 4 ? 20 : 40;
  size_t limit = p.family == 4 ? kMaxIcmp4Error : kMaxIcmp6Error;
  size_t quote = p.length < limit - header - 8 ? p.length : limit - header - 8;
  uint8_t src[16], dst[16];
  std::memcpy(src, p.dst(), n);
  std::memcpy(dst, p.src(), n);
  uint8_t protocol = p.family == 4 ? kProtoIcmp : kProtoIcmp6;
  detail::WriteIpHeader(out, p.family, protocol, src, dst, 8 + quote);
  uint8_t* icmp = out + header;
  std::memset(icmp, 0, 8);
  icmp[0] = p.family == 4 ? 3 : 1;
  icmp[1] = p.family == 4 ? 13 : 1;
  std::memcpy(icmp + 8, p.ip, quote);
  uint64_t sum = SumBytes(icmp, 8 + quote);
  if (p.family == 6) sum += PseudoSum(src, dst, 16, kProtoIcmp6, 8 + quote);
  Store16(icmp + 2, static_cast<uint16_t>(~Fold(sum)));
  return header + 8 + quote;
}

// Writes into `out` (kMaxReply bytes at least) the RST|ACK a closed port would answer a SYN with (RFC 9293
// §3.10.7.1): from the SYN's destination to its source, seq 0, ack = the SYN's seq + 1 + its payload. Returns
// the length.
inline size_t BuildRst(const Packet& syn, uint8_t* out) {
  size_t n = syn.address_size();
  uint8_t src[16], dst[16];
  std::memcpy(src, syn.dst(), n);
  std::memcpy(dst, syn.src(), n);
  size_t header = detail::WriteIpHeader(out, syn.family, kProtoTcp, src, dst, 20);
  uint8_t* tcp = out + header;
  std::memset(tcp, 0, 20);
  std::memcpy(tcp, syn.l4 + 2, 2);
  std::memcpy(tcp + 2, syn.l4, 2);
  uint32_t seq = static_cast<uint32_t>(syn.l4[4]) << 24 | static_cast<uint32_t>(syn.l4[5]) << 16 |
                 static_cast<uint32_t>(syn.l4[6]) << 8 | syn.l4[7];
  uint32_t ack = seq + 1 + static_cast<uint32_t>(syn.payload());
  tcp[8] = static_cast<uint8_t>(ack >> 24);
  tcp[9] = static_cast<uint8_t>(ack >> 16);
  tcp[10] = static_cast<uint8_t>(ack >> 8);
  tcp[11] = static_cast<uint8_t>(ack);
  tcp[12] = 5 << 4;
  tcp[13] = packet::kTcpRst | packet::kTcpAck;
  uint64_t sum = SumBytes(tcp, 20) + PseudoSum(src, dst, n, kProtoTcp, 20);
  Store16(tcp + 16, static_cast<uint16_t>(~Fold(sum)));
  return header + 20;
}

}  // namespace fdferry::ip
