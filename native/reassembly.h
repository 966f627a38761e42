// IPv4 and IPv6 fragment reassembly for Fish's pump, and the IPv6 splitting Fish does itself. Pure: no syscalls,
// time is passed in, so the same code runs in the data plane and in the libFuzzer target (native/fuzz/).
//
// RFCs: 791 §3.2 (IPv4 reassembly), 8200 §4.5 (IPv6 Fragment header, reassembly and fragmentation), 5722 (IPv6:
// overlapping fragments discard the whole datagram), 6946 (atomic fragments). Recipe: notes/fish-kernel.md §4
// "Fragments". The reassembled IPv4 header is a new header, so its checksum is summed afresh rather than
// adjusted; that launders nothing: each fragment's header was verified (when the pump verifies), and the L4
// checksum, which covers the client's data, is only ever checked and adjusted, never recomputed.
//
// Why Fish reassembles at all: a non-first fragment carries no ports, so it cannot be mapped; and the NAT must
// change the ports (and so the L4 checksum) of the first fragment consistently with the rest. Reassembling, then
// treating the whole datagram as one packet, keeps every other code path unchanged.
//
// Every datagram is keyed by (scope, family, source, destination, identification, and for IPv4 the protocol;
// RFC 8200 keys IPv6 on the addresses and identification only, the fragments' next-header values may differ).
// The scope keeps clients apart on egress (one per registration: clients may use the same addresses and IDs).
//
// Bounds, each drop counted (per fragment, so that every fragment given to Add is either part of a delivered
// datagram, held, or in exactly one counter):
//   fragmentTimeout    the datagram was not complete within `timeout_ms` of its first fragment
//   fragmentOverlap    a fragment overlaps another (RFC 5722: the whole datagram goes, and later fragments of
//                      it until its timeout), disagrees with the datagram's end, or duplicates one exactly
//                      (only the duplicate goes, as Linux does)
//   fragmentTooBig     the datagram would exceed 65535 bytes (header included: one pump buffer), or has more
//                      than kMaxPieces fragments
//   fragmentTableFull  `max_entries` datagrams are in progress, or `max_scope_entries` of one scope (so one
//                      client cannot take the egress table from the others), or their bytes exceed `max_bytes`
// Malformed fragments are refused with the parse verdicts of ip_packet.h (truncated, badHeader, badChecksum).
//
// Packets are hostile: every read is bounded by the fragment's real length and its own length fields.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#include "ip_packet.h"

namespace fdferry::reassembly {

using packet::Fold;
using packet::Store16;
using packet::SumBytes;

// The largest datagram Fish rebuilds, header included: one pump buffer, and the IPv4 total length field.
constexpr size_t kMaxDatagram = 65535;
// Fragments per datagram: 65535 bytes at a 576-byte MTU is ~120; more only costs time on insertion.
constexpr size_t kMaxPieces = 256;
// What one held fragment costs beyond its bytes (bookkeeping), for the byte bound.
constexpr size_t kPieceOverhead = 64;
// How often Add looks for timed-out datagrams itself (the pump's tick calls Expire too).
constexpr int64_t kExpireEveryMs = 100;

enum class Drop { kTimeout, kOverlap, kTooBig, kTableFull };

inline const char* DropName(Drop drop) {
  switch (drop) {
    case Drop::kTimeout: return "fragmentTimeout";
    case Drop::kOverlap: return "fragmentOverlap";
    case Drop::kTooBig: return "fragmentTooBig";
    case Drop::kTableFull: return "fragmentTableFull";
  }
  return "unknown";
}

// A fragment as far as reassembly cares; pointers into the caller's buffer.
struct Fragment {
  int family = 0;
  const uint8_t* header = nullptr;  // the IP header (IPv4 with options; IPv6 the fixed 40 bytes)
  size_t header_length = 0;
  uint32_t id = 0;
  uint8_t protocol = 0;             // IPv4: the protocol; IPv6: the Fragment header's next header
  size_t offset = 0;                // bytes
  const uint8_t* data = nullptr;    // the fragment's share of the payload
  size_t length = 0;
  bool more = false;
};

// True if `data` is an IPv4 or IPv6 fragment (what ip::Parse calls kFragment at the outer level).
inline bool IsFragment(const uint8_t* data, size_t size) {
  if (size < 1) return false;
  if ((data[0] >> 4) == 4) return size >= 20 && (ip::Load16(data + 6) & 0x3fff) != 0;
  return (data[0] >> 4) == 6 && size >= 40 && data[6] == 44;
}

// Parses one fragment; kOk fills `out`. IPv6 fragments whose Fragment header follows other extension headers
// are not seen here (ip::Parse refuses those as kExtensionHeader first).
inline ip::Verdict ParseFragment(const uint8_t* data, size_t size, bool verify_checksum, Fragment* out) {
  Fragment f;
  if (size < 1) return ip::Verdict::kTruncated;
  int version = data[0] >> 4;
  size_t total;
  uint16_t word;
  if (version == 4) {
    if (size < 20) return ip::Verdict::kTruncated;
    f.family = 4;
    f.header_length = static_cast<size_t>(data[0] & 0x0f) * 4;
    if (f.header_length < 20) return ip::Verdict::kBadHeader;
    total = ip::Load16(data + 2);
    if (total < f.header_length || total > size) return ip::Verdict::kTruncated;
    if (verify_checksum && Fold(SumBytes(data, f.header_length)) != 0xffff) return ip::Verdict::kBadChecksum;
    word = ip::Load16(data + 6);
    f.more = (word & 0x2000) != 0;
    f.offset = static_cast<size_t>(word & 0x1fff) * 8;
    f.id = ip::Load16(data + 4);
    f.protocol = data[9];
  } else if (version == 6) {
    if (size < 40) return ip::Verdict::kTruncated;
    f.family = 6;
    f.header_length = 40;
    total = 40 + static_cast<size_t>(ip::Load16(data + 4));
    if (total > size) return ip::Verdict::kTruncated;
    if (data[6] != 44) return ip::Verdict::kProtocol;
    if (total < 48) return ip::Verdict::kTruncated;
    const uint8_t* fh = data + 40;
    f.protocol = fh[0];
    word = ip::Load16(fh + 2);
    f.more = (word & 1) != 0;
    f.offset = static_cast<size_t>(word >> 3) * 8;
    f.id = static_cast<uint32_t>(fh[4]) << 24 | static_cast<uint32_t>(fh[5]) << 16 | static_cast<uint32_t>(fh[6]) << 8 | fh[7];
  } else {
    return ip::Verdict::kBadVersion;
  }
  f.header = data;
  size_t start = f.family == 4 ? f.header_length : 48;
  f.data = data + start;
  f.length = total - start;
  // RFC 791 / 8200 §4.5: every fragment but the last carries a multiple of 8 bytes; an empty one says nothing.
  if (f.length == 0 || (f.more && f.length % 8 != 0)) return ip::Verdict::kBadHeader;
  *out = f;
  return ip::Verdict::kOk;
}

// One datagram being rebuilt.
struct Entry {
  struct Piece {
    size_t offset;
    std::vector<uint8_t> bytes;
  };
  int64_t created = 0;
  bool dead = false;                   // dropped (overlap, too big): later fragments are discarded until timeout
  Drop dead_reason = Drop::kOverlap;   // and counted under this
  uint32_t scope = 0;
  std::array<uint8_t, 60> header{};    // the first fragment's IP header
  size_t header_length = 0;            // 0 until the first fragment (offset 0) arrived
  uint8_t first_next = 0;              // IPv6: the first fragment's Fragment next header
  size_t end = 0;                      // the payload's length once the last fragment arrived, else 0
  size_t received = 0;                 // payload bytes held (pieces never overlap)
  size_t cost = 0;                     // what the byte bound charges
  std::vector<Piece> pieces;           // sorted by offset
};

struct Settings {
  int64_t timeout_ms = 5000;
  size_t max_entries = 1024;
  size_t max_scope_entries = 256;
  size_t max_bytes = 4 << 20;          // Linux's ipfrag_high_thresh default
};

// What Add did with a fragment.
enum class Outcome { kHeld, kComplete, kDropped, kInvalid };

struct Result {
  Outcome outcome = Outcome::kHeld;
  size_t length = 0;                   // kComplete: the datagram's length in `out`
  Drop drop = Drop::kTimeout;          // kDropped: why
  size_t count = 0;                    // kDropped: fragments dropped, this one included; kComplete: fragments used
  ip::Verdict verdict = ip::Verdict::kOk;  // kInvalid: why the fragment did not parse
};

class Reassembler {
 public:
  using Key = std::array<uint8_t, 44>;
  // Told of fragments dropped outside Add's result (timeouts), per scope.
  using DropSink = std::function<void(uint32_t scope, Drop drop, size_t count)>;

  explicit Reassembler(Settings settings = {}, DropSink sink = {}) : settings_(settings), sink_(std::move(sink)) {}

  void Configure(Settings settings) { settings_ = settings; }
  size_t entries() const { return table_.size(); }
  size_t bytes() const { return bytes_; }
  // Fragments held in live (not dropped) entries.
  size_t held() const {
    size_t n = 0;
    for (auto& [key, e] : table_) n += e.dead ? 0 : e.pieces.size();
    return n;
  }

  // Adds one fragment (`data[0, size)`, already known to be one: IsFragment). When it completes its datagram,
  // the datagram is written to `out` (`capacity` bytes, at least kMaxDatagram; it may alias `data`: the
  // fragment is copied in before anything is written) and kComplete returned.
  Result Add(const uint8_t* data, size_t size, uint32_t scope, int64_t now, bool verify_checksum, uint8_t* out,
             size_t capacity) {
    Result result;
    Fragment f;
    ip::Verdict verdict = ParseFragment(data, size, verify_checksum, &f);
    if (verdict != ip::Verdict::kOk) {
      result.outcome = Outcome::kInvalid;
      result.verdict = verdict;
      return result;
    }
    // A scan of the table, so not per fragment: every kExpireEveryMs, and before refusing for want of room.
    if (now - last_expire_ >= kExpireEveryMs || table_.size() >= settings_.max_entries ||
        bytes_ + f.length + kPieceOverhead > settings_.max_bytes) {
      Expire(now);
    }
    Key key = KeyOf(f, scope);
    auto found = table_.find(key);
    // Past what any datagram can hold even with the smallest header: its entry (if any) dies with it. (IPv4
    // options of the first fragment may still push a datagram over; the completion checks that.)
    if ((f.family == 4 ? 20 : 40) + f.offset + f.length > kMaxDatagram) {
      if (found != table_.end()) return Kill(found->second, Drop::kTooBig, 1);
      return Dropped(Drop::kTooBig, 1);
    }
    if (found == table_.end()) {
      size_t& in_scope = scopes_[scope];
      if (table_.size() >= settings_.max_entries || in_scope >= settings_.max_scope_entries ||
          bytes_ + f.length + kPieceOverhead > settings_.max_bytes) {
        if (in_scope == 0) scopes_.erase(scope);
        return Dropped(Drop::kTableFull, 1);
      }
      in_scope++;
      Entry entry;
      entry.created = now;
      entry.scope = scope;
      found = table_.emplace(key, std::move(entry)).first;
    }
    Entry& e = found->second;
    if (e.dead) return Dropped(e.dead_reason, 1);
    if (e.pieces.size() >= kMaxPieces) return Kill(e, Drop::kTooBig, 1);
    size_t end = f.offset + f.length;
    if (!f.more) {
      // The last fragment fixes the end; one that disagrees with it or with data already held is inconsistent.
      if ((e.end != 0 && e.end != end) || (!e.pieces.empty() && e.pieces.back().offset + e.pieces.back().bytes.size() > end)) {
        return Kill(e, Drop::kOverlap, 1);
      }
    } else if (e.end != 0 && end > e.end) {
      return Kill(e, Drop::kOverlap, 1);
    }
    // Where it goes among the sorted pieces, and whether it touches a neighbour.
    auto at = std::lower_bound(e.pieces.begin(), e.pieces.end(), f.offset,
                               [](const Entry::Piece& piece, size_t offset) { return piece.offset < offset; });
    if (at != e.pieces.end() && at->offset == f.offset && at->bytes.size() == f.length) {
      return Dropped(Drop::kOverlap, 1);  // an exact duplicate (a retransmission): only it goes
    }
    if ((at != e.pieces.end() && at->offset < end) ||
        (at != e.pieces.begin() && std::prev(at)->offset + std::prev(at)->bytes.size() > f.offset)) {
      return Kill(e, Drop::kOverlap, 1);
    }
    if (bytes_ + f.length + kPieceOverhead > settings_.max_bytes) {
      // No room for it: the datagram cannot complete, so it goes whole rather than wait for its timeout.
      return Kill(e, Drop::kTableFull, 1);
    }
    if (f.offset == 0) {
      std::memcpy(e.header.data(), f.header, f.header_length);
      e.header_length = f.header_length;
      e.first_next = f.protocol;
    }
    if (!f.more) e.end = end;
    e.pieces.insert(at, Entry::Piece{f.offset, std::vector<uint8_t>(f.data, f.data + f.length)});
    e.received += f.length;
    e.cost += f.length + kPieceOverhead;
    bytes_ += f.length + kPieceOverhead;
    if (e.end == 0 || e.header_length == 0 || e.received != e.end) return result;  // held

    // Complete: pieces never overlap and cover `end` bytes from 0, so they are contiguous.
    size_t total = e.header_length + e.end;
    if (total > kMaxDatagram || total > capacity) return Kill(e, Drop::kTooBig, 0);
    int family = f.family;
    Entry done = std::move(e);
    Erase(found);  // charges the bounds back from the moved-from entry, whose counters moved as copies
    size_t at_byte = done.header_length;
    for (const Entry::Piece& piece : done.pieces) {
      std::memcpy(out + at_byte, piece.bytes.data(), piece.bytes.size());
      at_byte += piece.bytes.size();
    }
    std::memcpy(out, done.header.data(), done.header_length);
    if (family == 4) {
      Store16(out + 2, static_cast<uint16_t>(total));
      out[6] &= 0x40;  // keep DF, clear MF and the offset
      out[7] = 0;
      Store16(out + 10, 0);
      Store16(out + 10, static_cast<uint16_t>(~Fold(SumBytes(out, done.header_length))));
    } else {
      Store16(out + 4, static_cast<uint16_t>(done.end));
      out[6] = done.first_next;
    }
    result.outcome = Outcome::kComplete;
    result.length = total;
    result.count = done.pieces.size();
    return result;
  }

  // Ends datagrams older than the timeout; their live fragments are reported to the sink as fragmentTimeout.
  void Expire(int64_t now) {
    last_expire_ = now;
    for (auto it = table_.begin(); it != table_.end();) {
      Entry& e = it->second;
      if (now - e.created < settings_.timeout_ms) {
        ++it;
        continue;
      }
      if (!e.dead && !e.pieces.empty() && sink_) sink_(e.scope, Drop::kTimeout, e.pieces.size());
      it = Erase(it);
    }
  }

  // Forgets every datagram of a scope (its registration went away), uncounted: nobody is left to count them for.
  void Forget(uint32_t scope) {
    for (auto it = table_.begin(); it != table_.end();) {
      if (it->second.scope == scope) {
        it = Erase(it);
      } else {
        ++it;
      }
    }
  }

 private:
  static Key KeyOf(const Fragment& f, uint32_t scope) {
    Key key{};
    uint8_t* k = key.data();
    k[0] = static_cast<uint8_t>(scope >> 24);
    k[1] = static_cast<uint8_t>(scope >> 16);
    k[2] = static_cast<uint8_t>(scope >> 8);
    k[3] = static_cast<uint8_t>(scope);
    k[4] = static_cast<uint8_t>(f.family);
    k[5] = f.family == 4 ? f.protocol : 0;
    k[6] = static_cast<uint8_t>(f.id >> 24);
    k[7] = static_cast<uint8_t>(f.id >> 16);
    k[8] = static_cast<uint8_t>(f.id >> 8);
    k[9] = static_cast<uint8_t>(f.id);
    size_t n = f.family == 4 ? 4 : 16;
    std::memcpy(k + 10, f.family == 4 ? f.header + 12 : f.header + 8, n);
    std::memcpy(k + 26, f.family == 4 ? f.header + 16 : f.header + 24, n);
    return key;
  }

  // Removes an entry with its share of the bounds.
  std::map<Key, Entry>::iterator Erase(std::map<Key, Entry>::iterator it) {
    bytes_ -= it->second.cost;
    auto scope = scopes_.find(it->second.scope);
    if (scope != scopes_.end() && --scope->second == 0) scopes_.erase(scope);
    return table_.erase(it);
  }

  static Result Dropped(Drop drop, size_t count) {
    Result result;
    result.outcome = Outcome::kDropped;
    result.drop = drop;
    result.count = count;
    return result;
  }

  // Drops a datagram's fragments and this one, and leaves a tombstone so its later fragments are discarded too
  // (RFC 5722) instead of starting a new datagram that could only time out.
  Result Kill(Entry& e, Drop drop, size_t extra) {
    if (e.dead) return Dropped(drop, extra);
    size_t count = e.pieces.size() + extra;
    bytes_ -= e.cost;
    e.cost = 0;
    e.pieces.clear();
    e.pieces.shrink_to_fit();
    e.dead = true;
    e.dead_reason = drop;
    return Dropped(drop, count);
  }

  Settings settings_;
  DropSink sink_;
  int64_t last_expire_ = 0;
  size_t bytes_ = 0;
  std::map<Key, Entry> table_;
  std::map<uint32_t, size_t> scopes_;  // entries per scope
};

// Splits an IPv6 datagram (`data[0, length)`, a fixed 40-byte header then its payload, no extension headers
// walked) into fragments of at most `mtu` bytes (at least 1280, RFC 8200 §5) with identification `id`, calling
// `emit(fragment, size)` for each, in order. `scratch` holds at least `mtu` bytes. Returns the number of
// fragments, 0 if `data` is no IPv6 datagram (then nothing is emitted).
template <typename Emit>
size_t SplitIpv6(const uint8_t* data, size_t length, size_t mtu, uint32_t id, uint8_t* scratch, Emit&& emit) {
  if (length < 40 || (data[0] >> 4) != 6 || 40 + static_cast<size_t>(ip::Load16(data + 4)) != length) return 0;
  if (mtu < 1280) mtu = 1280;
  size_t payload = length - 40;
  size_t chunk = (mtu - 48) / 8 * 8;
  size_t count = 0;
  for (size_t offset = 0; offset < payload || (payload == 0 && count == 0); offset += chunk) {
    size_t n = std::min(chunk, payload - offset);
    bool more = offset + n < payload;
    std::memcpy(scratch, data, 40);
    Store16(scratch + 4, static_cast<uint16_t>(8 + n));
    scratch[6] = 44;
    uint8_t* fh = scratch + 40;
    fh[0] = data[6];
    fh[1] = 0;
    Store16(fh + 2, static_cast<uint16_t>(offset | (more ? 1 : 0)));
    fh[4] = static_cast<uint8_t>(id >> 24);
    fh[5] = static_cast<uint8_t>(id >> 16);
    fh[6] = static_cast<uint8_t>(id >> 8);
    fh[7] = static_cast<uint8_t>(id);
    if (n != 0) std::memcpy(scratch + 48, data + 40 + offset, n);
    emit(static_cast<const uint8_t*>(scratch), 48 + n);
    count++;
    if (payload == 0) break;
  }
  return count;
}

}  // namespace fdferry::reassembly
