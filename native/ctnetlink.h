// The ctnetlink messages Fish's data plane sends itself: the exclusive create that reserves a new flow's egress
// five-tuple, the lookup that revalidates an idle mapping, and the reading of their answers. Pure functions over
// byte buffers, no syscalls; the socket lives in fish_pump.cc. The control plane (flushes, dumps, DESTROY
// events) encodes its own messages in TypeScript.
//
// Man pages: netlink(7), netlink(3). Kernel uapi: linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h,
// nf_conntrack_common.h. Recipe and a verified sample: notes/fish-kernel.md §7.
//
// Layout reminders: nlmsghdr and nlattr headers are host order; conntrack scalars are big-endian; attribute
// lengths are unpadded, payloads padded to 4.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace fdferry::ctnetlink {

constexpr uint16_t kMsgNew = 0x100;  // (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
constexpr uint16_t kMsgGet = 0x101;
constexpr uint16_t kNlmsgError = 2;
constexpr uint16_t kNlmsgDone = 3;
constexpr uint16_t kFlagRequest = 0x1, kFlagAck = 0x4, kFlagExcl = 0x200, kFlagCreate = 0x400;
constexpr uint16_t kNested = 0x8000;

constexpr uint16_t kCtaTupleOrig = 1, kCtaTupleReply = 2, kCtaStatus = 3, kCtaTimeout = 7, kCtaMark = 8,
                   kCtaLabels = 22;
constexpr uint16_t kCtaTupleIp = 1, kCtaTupleProto = 2;
constexpr uint16_t kCtaIpV4Src = 1, kCtaIpV4Dst = 2, kCtaIpV6Src = 3, kCtaIpV6Dst = 4;
constexpr uint16_t kCtaProtoNum = 1, kCtaProtoSrcPort = 2, kCtaProtoDstPort = 3;
constexpr uint16_t kCtaProtoIcmpId = 4, kCtaProtoIcmpType = 5, kCtaProtoIcmpCode = 6;
constexpr uint16_t kCtaProtoIcmp6Id = 7, kCtaProtoIcmp6Type = 8, kCtaProtoIcmp6Code = 9;
// IPS_CONFIRMED makes the entry visible at once; IPS_ASSURED (only accepted together with CONFIRMED: -EBUSY
// otherwise) keeps it from early drop when the table is full.
constexpr uint32_t kStatusConfirmed = 0x8, kStatusAssured = 0x4;

// Big enough for any message here (the IPv6 reservation is 216 bytes).
constexpr size_t kMaxMessage = 512;

// One side of a flow as conntrack names it. For ICMP echo, `sport` is the echo id and `dport` is unused; the
// protocol is 1 for both families (58 is used on the wire for IPv6).
struct Tuple {
  int family = 4;
  uint8_t protocol = 6;  // 6, 17 or 1 (ICMP echo)
  uint8_t src[16] = {};
  uint8_t dst[16] = {};
  uint16_t sport = 0;
  uint16_t dport = 0;
};

// A reservation: the ORIG tuple (E:eport -> dst:dport), and what the entry records about the client.
struct Reservation {
  Tuple orig;
  uint32_t timeout_s = 30;
  // CTA_STATUS: what the pump sends; the sample of notes §7 was taken with CONFIRMED alone.
  uint32_t status = kStatusConfirmed | kStatusAssured;
  uint32_t mark = 0;
  uint16_t rid = 0;
  uint16_t client_port = 0;
  // IPv4: the whole address in the first 4 bytes; IPv6: all 16 (the low 64 bits are recorded).
  uint8_t client[16] = {};
};

namespace detail {

// Appends attributes to a message buffer; nests are closed by patching their length.
class Writer {
 public:
  explicit Writer(uint8_t* out) : out_(out) {}
  size_t size() const { return size_; }
  void Bytes(const void* data, size_t length) {
    std::memcpy(out_ + size_, data, length);
    size_ += length;
  }
  void Host16(uint16_t value) { Bytes(&value, 2); }
  void Host32(uint32_t value) { Bytes(&value, 4); }
  void Attr(uint16_t type, const void* data, size_t length) {
    Host16(static_cast<uint16_t>(4 + length));
    Host16(type);
    Bytes(data, length);
    while (size_ % 4 != 0) out_[size_++] = 0;
  }
  void U8(uint16_t type, uint8_t value) { Attr(type, &value, 1); }
  void Be16(uint16_t type, uint16_t value) {
    uint8_t b[2] = {static_cast<uint8_t>(value >> 8), static_cast<uint8_t>(value)};
    Attr(type, b, 2);
  }
  void Be32(uint16_t type, uint32_t value) {
    uint8_t b[4] = {static_cast<uint8_t>(value >> 24), static_cast<uint8_t>(value >> 16),
                    static_cast<uint8_t>(value >> 8), static_cast<uint8_t>(value)};
    Attr(type, b, 4);
  }
  size_t Begin(uint16_t type) {
    size_t at = size_;
    Host16(0);
    Host16(static_cast<uint16_t>(type | kNested));
    return at;
  }
  void End(size_t at) {
    uint16_t length = static_cast<uint16_t>(size_ - at);
    std::memcpy(out_ + at, &length, 2);
  }
  void Header(uint16_t type, uint16_t flags, uint32_t seq, int family) {
    Host32(0);  // patched by Finish
    Host16(type);
    Host16(flags);
    Host32(seq);
    Host32(0);  // nl_pid: the kernel
    uint8_t nfgen[4] = {static_cast<uint8_t>(family == 4 ? 2 : 10), 0, 0, 0};
    Bytes(nfgen, 4);
  }
  size_t Finish() {
    uint32_t length = static_cast<uint32_t>(size_);
    std::memcpy(out_, &length, 4);
    return size_;
  }

 private:
  uint8_t* out_;
  size_t size_ = 0;
};

// CTA_TUPLE_ORIG or CTA_TUPLE_REPLY. `reply` swaps the ends and, for ICMP, turns the echo request into its
// reply type: the kernel derives one from the other and insists they match.
inline void WriteTuple(Writer& w, uint16_t which, const Tuple& t, bool reply) {
  size_t n = t.family == 4 ? 4 : 16;
  const uint8_t* src = reply ? t.dst : t.src;
  const uint8_t* dst = reply ? t.src : t.dst;
  size_t tuple = w.Begin(which);
  size_t ip = w.Begin(kCtaTupleIp);
  w.Attr(t.family == 4 ? kCtaIpV4Src : kCtaIpV6Src, src, n);
  w.Attr(t.family == 4 ? kCtaIpV4Dst : kCtaIpV6Dst, dst, n);
  w.End(ip);
  size_t proto = w.Begin(kCtaTupleProto);
  if (t.protocol == 1) {
    bool v4 = t.family == 4;
    w.U8(kCtaProtoNum, v4 ? 1 : 58);
    w.Be16(v4 ? kCtaProtoIcmpId : kCtaProtoIcmp6Id, t.sport);
    w.U8(v4 ? kCtaProtoIcmpType : kCtaProtoIcmp6Type, v4 ? (reply ? 0 : 8) : (reply ? 129 : 128));
    w.U8(v4 ? kCtaProtoIcmpCode : kCtaProtoIcmp6Code, 0);
  } else {
    w.U8(kCtaProtoNum, t.protocol);
    w.Be16(kCtaProtoSrcPort, reply ? t.dport : t.sport);
    w.Be16(kCtaProtoDstPort, reply ? t.sport : t.dport);
  }
  w.End(proto);
  w.End(tuple);
}

}  // namespace detail

// The reservation (notes §7): NEW with REQUEST|ACK|CREATE|EXCL, ORIG, REPLY (swapped), TIMEOUT, STATUS
// CONFIRMED|ASSURED, MARK, LABELS (be32 rid | be16 client port | u8 version 1 | u8 4 or 6 | 8 address bytes:
// IPv4 whole and zero padded, IPv6 the low 64 bits). EXCL makes the kernel arbitrate: `-EEXIST` when either
// direction's tuple is taken. Writes at most kMaxMessage bytes into `out`; returns the length.
inline size_t BuildReservation(uint8_t* out, uint32_t seq, const Reservation& r) {
  detail::Writer w(out);
  w.Header(kMsgNew, kFlagRequest | kFlagAck | kFlagCreate | kFlagExcl, seq, r.orig.family);
  detail::WriteTuple(w, kCtaTupleOrig, r.orig, false);
  detail::WriteTuple(w, kCtaTupleReply, r.orig, true);
  w.Be32(kCtaTimeout, r.timeout_s);
  w.Be32(kCtaStatus, r.status);
  w.Be32(kCtaMark, r.mark);
  uint8_t labels[16] = {};
  labels[2] = static_cast<uint8_t>(r.rid >> 8);
  labels[3] = static_cast<uint8_t>(r.rid);
  labels[4] = static_cast<uint8_t>(r.client_port >> 8);
  labels[5] = static_cast<uint8_t>(r.client_port);
  labels[6] = 1;
  labels[7] = static_cast<uint8_t>(r.orig.family);
  if (r.orig.family == 4) {
    std::memcpy(labels + 8, r.client, 4);
  } else {
    std::memcpy(labels + 8, r.client + 8, 8);
  }
  w.Attr(kCtaLabels, labels, 16);
  return w.Finish();
}

// A lookup by ORIG tuple: GET with REQUEST|ACK. The kernel answers with the entry (a NEW message) and an ack,
// or with `-ENOENT` (a lookup also reaps an expired, unreaped entry). Returns the length.
inline size_t BuildGet(uint8_t* out, uint32_t seq, const Tuple& orig) {
  detail::Writer w(out);
  w.Header(kMsgGet, kFlagRequest | kFlagAck, seq, orig.family);
  detail::WriteTuple(w, kCtaTupleOrig, orig, false);
  return w.Finish();
}

// What one received datagram says about request `seq`.
struct Answer {
  bool acked = false;     // an NLMSG_ERROR for `seq` was found: `error` is its errno (0 = success)
  int error = 0;
  bool has_mark = false;  // an entry for `seq` was found and carried CTA_MARK
  uint32_t mark = 0;
};

// Walks the netlink messages in `data[0, size)`, ignoring those of other sequence numbers (late answers to a
// request that timed out). Never reads past `size`; malformed messages end the walk.
inline void ReadAnswer(const uint8_t* data, size_t size, uint32_t seq, Answer* answer) {
  size_t at = 0;
  while (at + 16 <= size) {
    uint32_t length;
    uint16_t type;
    uint32_t message_seq;
    std::memcpy(&length, data + at, 4);
    std::memcpy(&type, data + at + 4, 2);
    std::memcpy(&message_seq, data + at + 8, 4);
    if (length < 16 || length > size - at) return;
    if (message_seq == seq) {
      if (type == kNlmsgError && length >= 20) {
        int32_t error;
        std::memcpy(&error, data + at + 16, 4);
        answer->acked = true;
        // -INT32_MIN overflows; no errno is that large, so such an answer is a protocol error.
        answer->error = error == INT32_MIN ? EPROTO : error < 0 ? -error : error;
      } else if (type == kMsgNew && length >= 20) {
        // nlmsghdr (16) + nfgenmsg (4), then top-level attributes.
        size_t attr = at + 20;
        size_t end = at + length;
        while (attr + 4 <= end) {
          uint16_t attr_length, attr_type;
          std::memcpy(&attr_length, data + attr, 2);
          std::memcpy(&attr_type, data + attr + 2, 2);
          if (attr_length < 4 || attr_length > end - attr) break;
          if ((attr_type & 0x3fff) == kCtaMark && attr_length >= 8) {
            const uint8_t* p = data + attr + 4;
            answer->has_mark = true;
            answer->mark = static_cast<uint32_t>(p[0]) << 24 | static_cast<uint32_t>(p[1]) << 16 |
                           static_cast<uint32_t>(p[2]) << 8 | p[3];
          }
          attr += (static_cast<size_t>(attr_length) + 3) & ~static_cast<size_t>(3);
        }
      }
    }
    at += (static_cast<size_t>(length) + 3) & ~static_cast<size_t>(3);
  }
}

}  // namespace fdferry::ctnetlink
