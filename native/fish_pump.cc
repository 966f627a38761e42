// Fish's data plane: registrations' packet sockets <-> a persistent tun, with NAT from a shared egress address
// and port slice, on one epoll thread.
//
// Man pages: epoll(7), epoll_ctl(2), eventfd(2), unix(7) (SOCK_SEQPACKET, MSG_TRUNC), recvmmsg(2), send(2),
// netlink(7), poll(2), getrandom(2). Recipe: notes/fish-kernel.md §1, §4-7, §9 (revalidation).
//
// A packet's life:
//   egress  recvmmsg(registration) -> parse (fragments: reassembled per registration first, native/reassembly.h)
//           -> mapping (rid, proto, family, client, cport, dst, dport): found
//           (revalidated with CT_GET when idle), or made: a port of the slice probed from a hash of the key,
//           reserved with an exclusive ctnetlink create (EEXIST: someone else holds that tuple, try the next)
//           -> source rewritten to E:eport (fresh IPv4 ID when DF=0, MSS clamp on SYN) -> write(tun): whole,
//           also a reassembled IPv4 datagram (the kernel re-fragments forwarded IPv4 when DF=0), but a
//           reassembled IPv6 one larger than the tun's MTU is split here with a fresh identification (the
//           kernel never fragments forwarded IPv6).
//   return  read(tun) -> parse (fragments: reassembled first; with conntrack the host defragments and
//           re-fragments to the original sizes before fish0, so they come both ways) -> reverse mapping
//           (proto, family, E, eport, remote, rport), for an ICMP error by the tuple it quotes -> destination
//           rewritten to the client (MSS clamp on SYN-ACK) -> send() on the registration's socket (sendmmsg
//           per run of one registration's packets), dropped when that socket is full (the client's stack
//           retransmits).
// Reservations are made synchronously on this thread: a ctnetlink round trip is microseconds, and a new flow's
// first packet must not reach the kernel before its tuple is reserved (notes §8: without it host NAT or a
// clash at confirm breaks the flow). No lock is taken on the data path: JS calls run here through CommandQueue.
//
// Ownership: the pump borrows the tun and every registration's socket and never closes them (JS owns every fd
// it knows of); it owns its epoll fd, its ctnetlink socket and a datagram socket for SIOCGIFMTU.
//
// Drop counters (stable names, for metrics):
//   per registration  the parse verdicts of ip_packet.h (truncated, badVersion, badHeader, fragment (now only an
//                     ICMP error quoting a non-first fragment), protocol, badChecksum, icmpError,
//                     extensionHeader); the reassembler's fragmentTimeout, fragmentOverlap, fragmentTooBig,
//                     fragmentTableFull (per fragment, native/reassembly.h); family (no egress address of that
//                     family);
//                     denied (protocol not allowed; the client is refused); noMapping (a TCP segment other than
//                     a SYN for no mapping); exhausted (a new flow refused: also counted in `exhausted`);
//                     remapped / revalidateFailed (revalidation moved a flow / got no usable answer);
//                     conntrackTimeout / conntrackOverrun (the ctnetlink socket); tunFull / tunError (write);
//                     full / sendError (the registration's socket refused a reply or a refusal).
//   returnDrops       the parse verdicts and the reassembler's, unmapped (no mapping for the tuple),
//                     noRegistration (a mapping installed by addMappings whose registration is not there).
#include "fish_pump.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <net/if.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "clock.h"
#include "ctnetlink.h"
#include "engine_events.h"
#include "engine_thread.h"
#include "errors.h"
#include "fd.h"
#include "ip_packet.h"
#include "js_fields.h"
#include "reassembly.h"

namespace fdferry {

namespace {

using ip::Kind;
using ip::Packet;
using ip::Verdict;

constexpr size_t kPacketBuffer = 64 * 1024;
// Messages read from one socket per wake-up before the others get a turn (level-triggered: what is left brings
// us straight back).
constexpr int kBatch = 64;
// Packets per recvmmsg: one syscall for a run of a registration's packets.
constexpr int kMmsg = 16;
constexpr int kTickMs = 100;
constexpr int64_t kExpireEveryMs = 1000;
// At most one `exhausted` event per registration per this long; the refusals in between are counted.
constexpr int64_t kExhaustedEventMs = 100;
// A ctnetlink round trip takes microseconds; this only bounds a kernel that does not answer at all.
constexpr int kConntrackTimeoutMs = 250;

enum ProtocolIndex { kTcp = 0, kUdp = 1, kIcmp = 2 };
const char* const kProtocolNames[] = {"tcp", "udp", "icmp"};

// Flow protocol (6, 17, or 1 for ICMP echo of either family) to its index in per-protocol settings.
int IndexOf(uint8_t protocol) { return protocol == ip::kProtoTcp ? kTcp : protocol == ip::kProtoUdp ? kUdp : kIcmp; }
uint8_t ProtocolOf(int index) { return index == kTcp ? ip::kProtoTcp : index == kUdp ? ip::kProtoUdp : ip::kProtoIcmp; }

// A table key as bytes: both tables key on 40 bytes of fixed layout, so hashing and comparing need no care for
// struct padding.
struct Key {
  std::array<uint8_t, 40> bytes{};
  bool operator==(const Key& other) const { return bytes == other.bytes; }
};

uint64_t Fnv(const uint8_t* data, size_t size, uint64_t hash = 1469598103934665603ull) {
  for (size_t i = 0; i < size; i++) hash = (hash ^ data[i]) * 1099511628211ull;
  return hash;
}

struct KeyHash {
  size_t operator()(const Key& key) const { return static_cast<size_t>(Fnv(key.bytes.data(), key.bytes.size())); }
};

// (rid, proto, family, client, cport, dst, dport): the client's view of a flow.
Key ForwardKey(uint16_t rid, uint8_t protocol, int family, const uint8_t* client, uint16_t client_port,
               const uint8_t* dst, uint16_t dport) {
  Key key;
  uint8_t* b = key.bytes.data();
  size_t n = family == 4 ? 4 : 16;
  packet::Store16(b, rid);
  b[2] = protocol;
  b[3] = static_cast<uint8_t>(family);
  std::memcpy(b + 4, client, n);
  packet::Store16(b + 20, client_port);
  std::memcpy(b + 22, dst, n);
  packet::Store16(b + 38, dport);
  return key;
}

// (proto, family, E, eport, remote, rport): the network's view, and what conntrack's uniqueness is about.
Key ReverseKey(uint8_t protocol, int family, const uint8_t* egress, uint16_t eport, const uint8_t* remote,
               uint16_t rport) {
  Key key;
  uint8_t* b = key.bytes.data();
  size_t n = family == 4 ? 4 : 16;
  b[0] = protocol;
  b[1] = static_cast<uint8_t>(family);
  std::memcpy(b + 2, egress, n);
  packet::Store16(b + 18, eport);
  std::memcpy(b + 20, remote, n);
  packet::Store16(b + 36, rport);
  return key;
}

struct Mapping {
  Key forward, reverse;
  uint16_t rid = 0;
  uint8_t protocol = 0;  // 6, 17, 1
  int family = 4;
  uint8_t client[16] = {};
  uint16_t client_port = 0;
  uint8_t dst[16] = {};
  uint16_t dport = 0;
  uint8_t egress[16] = {};
  uint16_t eport = 0;
  uint64_t packets_out = 0;  // client -> network
  uint64_t packets_in = 0;
  int64_t last_activity = 0;
};

struct Registration;

// What an epoll registration points at.
struct Tag {
  enum Kind { kWake, kTun, kRegistration } kind;
  Registration* registration = nullptr;
};

struct Registration {
  uint16_t rid = 0;
  int fd = -1;
  bool has4 = false, has6 = false;
  uint8_t egress4[16] = {};
  uint8_t egress6[16] = {};
  uint16_t port_lo = 0, port_hi = 0;
  bool protocols[3] = {};
  uint32_t max_mappings = 0;

  uint64_t packets_out = 0, packets_in = 0, bytes_out = 0, bytes_in = 0;
  uint64_t reserved = 0, collisions = 0, exhausted = 0;
  std::map<std::string, uint64_t> drops;

  // Rate limit of `exhausted` events: the last event's time, refusals since, and the latest of them (reported
  // by the tick when nothing else comes to carry the count).
  int64_t last_exhausted_event = -1000000;
  uint64_t suppressed = 0;
  struct Refusal {
    uint8_t protocol = 0;
    int family = 4;
    uint8_t client[16] = {}, dst[16] = {};
    uint16_t client_port = 0, dport = 0;
    const char* reason = "slice";
    int err = 0;
  } last_refusal;

  Tag tag{Tag::kRegistration};
  bool watched = false;
  bool closed = false;

  const uint8_t* egress(int family) const { return family == 4 ? egress4 : egress6; }
  void Drop(const char* reason) { drops[reason]++; }
};

struct Settings {
  int tun_fd = -1;
  uint32_t mark_base = 0;
  uint16_t mss_clamp = 0;
  uint32_t reserve_timeout_s[3] = {60, 30, 30};
  int64_t idle_timeout_ms[3] = {7440000, 300000, 30000};
  int64_t revalidate_after_ms = 5000;
  bool verify_checksums = true;
  // Fragment reassembly bounds, per direction (egress: one table shared by the registrations, keyed by rid).
  reassembly::Settings fragments;
  // The tun's MTU for splitting IPv6; 0: read from the device (SIOCGIFMTU), again every kExpireEveryMs.
  uint32_t tun_mtu = 0;
};

// One event for JS.
struct EventRecord {
  enum Kind { kExhausted, kClosed, kNotice } kind;
  explicit EventRecord(Kind of) : kind(of) {}
  uint16_t rid = 0;
  Registration::Refusal refusal;
  uint64_t suppressed = 0;
  const char* reason = nullptr;
  int err = 0;
  std::string code;
  std::string message;
};

struct RegistrationStats {
  uint16_t rid;
  uint64_t mappings, packets_out, packets_in, bytes_out, bytes_in, reserved, collisions, exhausted;
  std::map<std::string, uint64_t> drops;
};

struct PumpStats {
  std::vector<RegistrationStats> registrations;
  std::map<std::string, uint64_t> return_drops;
  uint64_t from_tun, to_tun;
};

struct MappingRow {
  Mapping mapping;
  int64_t idle_ms;
};

// Thrown by a command to become a JS error in the calling thread.
struct CommandError {
  std::string code;
  std::string message;
  int err = 0;           // set: an errno error from `syscall`
  std::string syscall;
};

// ---------------------------------------------------------------------------------------------------------------

class PumpThread : public EngineThread {
 public:
  PumpThread(std::shared_ptr<Outbox<EventRecord>> events, Settings settings)
      : EngineThread(&wake_tag_),
        events_(std::move(events)), settings_(settings),
        batch_(new uint8_t[kMmsg * kPacketBuffer]),
        assembled_(new uint8_t[kPacketBuffer]),
        split_(new uint8_t[kPacketBuffer]),
        egress_fragments_(settings.fragments,
                          [this](uint32_t rid, reassembly::Drop drop, size_t count) {
                            auto found = registrations_.find(static_cast<uint16_t>(rid));
                            if (found != registrations_.end()) found->second->drops[reassembly::DropName(drop)] += count;
                          }),
        return_fragments_(settings.fragments, [this](uint32_t, reassembly::Drop drop, size_t count) {
          return_drops_[reassembly::DropName(drop)] += count;
        }) {
    // Created on the calling (JS) thread, so it lives in the daemon's network namespace: conntrack is per
    // namespace, and the reservations must land where the tun's packets are forwarded.
    ct_fd_.reset(socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_NETFILTER));
    if (!ct_fd_.valid()) throw std::system_error(errno, std::generic_category(), "socket");
    sockaddr_nl local{};
    local.nl_family = AF_NETLINK;
    if (bind(ct_fd_.get(), reinterpret_cast<sockaddr*>(&local), sizeof local) < 0) {
      throw std::system_error(errno, std::generic_category(), "bind");
    }
    // Acks then carry only the request's header, not the whole request back.
    int one = 1;
    setsockopt(ct_fd_.get(), SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
    if (getrandom(&secret_, sizeof secret_, GRND_NONBLOCK) != sizeof secret_) secret_ = Fnv(nullptr, 0) ^ static_cast<uint64_t>(WallMs());
    next_ip_id_ = static_cast<uint16_t>(secret_ >> 48);
    next_ip6_id_ = static_cast<uint32_t>(secret_ >> 16);
    // Only for SIOCGIFMTU on the tun's device; without it IPv6 is split for the minimum MTU, 1280.
    ioctl_fd_.reset(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    RefreshTunMtu();
    seq_ = static_cast<uint32_t>(secret_);
    WatchTun();
    Start([this] { Run(); });
  }

  ~PumpThread() { Stop(); }

  // --- commands (run on the thread) ---

  // One registration socket carries every flow of a client, and a download's replies arrive in bursts the
  // proxy drains a little later: the default ~200 KiB of a Unix socket overflowed in tests (drops counted as
  // "full", TCP recovering by retransmission). SO_*BUFFORCE needs CAP_NET_ADMIN, which Fish has; without it
  // the plain options still raise the buffers up to wmem_max / rmem_max.
  static void RaiseSocketBuffers(int fd) {
    int size = 4 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  }

  void AddRegistration(std::unique_ptr<Registration> registration) {
    if (registrations_.count(registration->rid) != 0) {
      throw CommandError{"EFDFERRY_EXISTS", "registration " + std::to_string(registration->rid) + " exists", 0, {}};
    }
    Registration* raw = registration.get();
    raw->tag.registration = raw;
    RaiseSocketBuffers(raw->fd);
    registrations_[raw->rid] = std::move(registration);
    if (!paused_ && !Watch(raw)) {
      int err = errno;
      registrations_.erase(raw->rid);
      throw CommandError{{}, {}, err, "epoll_ctl"};
    }
    if (!paused_) OnRegistrationReadable(raw);
  }

  bool RemoveRegistration(uint16_t rid) {
    auto found = registrations_.find(rid);
    if (found == registrations_.end()) return false;
    Forget(found->second.get());
    return true;
  }

  void AddMappings(std::vector<Mapping> mappings) {
    int64_t now = MonotonicMs();
    for (Mapping& m : mappings) {
      m.forward = ForwardKey(m.rid, m.protocol, m.family, m.client, m.client_port, m.dst, m.dport);
      m.reverse = ReverseKey(m.protocol, m.family, m.egress, m.eport, m.dst, m.dport);
      if (forward_.count(m.forward) != 0 || reverse_.count(m.reverse) != 0) continue;
      m.last_activity = now;
      Install(std::make_unique<Mapping>(m));
    }
  }

  std::vector<MappingRow> Rows(int rid) {
    std::vector<MappingRow> rows;
    int64_t now = MonotonicMs();
    for (auto& [key, m] : forward_) {
      if (rid >= 0 && m->rid != rid) continue;
      rows.push_back({*m, now - m->last_activity});
    }
    return rows;
  }

  PumpStats Stats() {
    PumpStats stats;
    std::unordered_map<uint16_t, uint64_t> counts;
    for (auto& [key, m] : forward_) counts[m->rid]++;
    for (auto& [rid, r] : registrations_) {
      stats.registrations.push_back({rid, counts[rid], r->packets_out, r->packets_in, r->bytes_out, r->bytes_in,
                                     r->reserved, r->collisions, r->exhausted, r->drops});
    }
    std::sort(stats.registrations.begin(), stats.registrations.end(),
              [](const RegistrationStats& a, const RegistrationStats& b) { return a.rid < b.rid; });
    stats.return_drops = return_drops_;
    stats.from_tun = from_tun_;
    stats.to_tun = to_tun_;
    return stats;
  }

  // Stops reading the tun and every registration (their packets wait in the kernel) and hands out the mappings.
  std::vector<MappingRow> Pause() {
    if (!paused_) {
      paused_ = true;
      epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, settings_.tun_fd, nullptr);
      for (auto& [rid, r] : registrations_) Unwatch(r.get());
    }
    return Rows(-1);
  }

  void Resume() {
    if (!paused_) return;
    paused_ = false;
    WatchTun();
    std::vector<Registration*> failed;
    for (auto& [rid, r] : registrations_) {
      if (!Watch(r.get())) failed.push_back(r.get());
    }
    for (Registration* r : failed) Close(r, "error", errno);
  }

 private:
  void Run() {
    epoll_event events[128];
    int64_t next_tick = MonotonicMs() + kTickMs;
    int64_t next_expiry = MonotonicMs() + kExpireEveryMs;
    while (!stopping()) {
      int timeout = static_cast<int>(std::max<int64_t>(0, next_tick - MonotonicMs()));
      int count = epoll_wait(epoll_fd(), events, 128, timeout);
      if (count < 0 && errno != EINTR) break;
      for (int i = 0; i < count && !stopping(); i++) {
        auto* tag = static_cast<Tag*>(events[i].data.ptr);
        switch (tag->kind) {
          case Tag::kWake:
            RunCommands();
            break;
          case Tag::kTun:
            if (!paused_ && tun_watched_) OnTunReadable();
            break;
          case Tag::kRegistration:
            if (!paused_ && !tag->registration->closed) OnRegistrationReadable(tag->registration);
            break;
        }
      }
      graveyard_.clear();
      int64_t now = MonotonicMs();
      if (now >= next_tick) {
        ReportSuppressed(now);
        // Incomplete datagrams time out even when no further fragment comes to notice it.
        egress_fragments_.Expire(now);
        return_fragments_.Expire(now);
        next_tick = now + kTickMs;
      }
      if (now >= next_expiry) {
        Expire(now);
        RefreshTunMtu();
        next_expiry = now + kExpireEveryMs;
      }
    }
    graveyard_.clear();
  }

  void WatchTun() {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.ptr = &tun_tag_;
    tun_watched_ = epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, settings_.tun_fd, &event) == 0 || errno == EEXIST;
  }

  bool Watch(Registration* r) {
    epoll_event event{};
    event.events = EPOLLIN | EPOLLRDHUP;
    event.data.ptr = &r->tag;
    if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, r->fd, &event) < 0 && errno != EEXIST) return false;
    r->watched = true;
    return true;
  }

  void Unwatch(Registration* r) {
    if (!r->watched) return;
    epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, r->fd, nullptr);
    r->watched = false;
  }

  void Notice(uint16_t rid, std::string code, std::string message) {
    EventRecord record(EventRecord::kNotice);
    record.rid = rid;
    record.code = std::move(code);
    record.message = std::move(message);
    events_->Push(std::move(record));
  }

  // Stops reading a registration and forgets it and its mappings. Its conntrack entries stay: the control plane
  // flushes them by mark (notes §9), or a successor adopts them.
  void Forget(Registration* r) {
    Unwatch(r);
    r->closed = true;
    egress_fragments_.Forget(r->rid);
    for (auto it = forward_.begin(); it != forward_.end();) {
      if (it->second->rid == r->rid) {
        reverse_.erase(it->second->reverse);
        counts_[r->rid]--;
        it = forward_.erase(it);
      } else {
        ++it;
      }
    }
    counts_.erase(r->rid);
    auto found = registrations_.find(r->rid);
    if (found != registrations_.end()) {
      // Later events of this epoll batch may still point at it.
      graveyard_.push_back(std::move(found->second));
      registrations_.erase(found);
    }
  }

  void Close(Registration* r, const char* reason, int err) {
    uint16_t rid = r->rid;
    Forget(r);
    EventRecord record(EventRecord::kClosed);
    record.rid = rid;
    record.reason = reason;
    record.err = err;
    events_->Push(std::move(record));
  }

  void Install(std::unique_ptr<Mapping> m) {
    reverse_[m->reverse] = m.get();
    counts_[m->rid]++;
    Key key = m->forward;
    forward_[key] = std::move(m);
  }

  void Remove(Mapping* m) {
    reverse_.erase(m->reverse);
    auto count = counts_.find(m->rid);
    if (count != counts_.end() && count->second > 0) count->second--;
    forward_.erase(m->forward);  // frees m
  }

  void Expire(int64_t now) {
    for (auto it = forward_.begin(); it != forward_.end();) {
      Mapping* m = it->second.get();
      if (now - m->last_activity > settings_.idle_timeout_ms[IndexOf(m->protocol)]) {
        reverse_.erase(m->reverse);
        auto count = counts_.find(m->rid);
        if (count != counts_.end() && count->second > 0) count->second--;
        it = forward_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // --- egress ---

  void PrepareBatch() {
    for (int i = 0; i < kMmsg; i++) {
      batch_iov_[i] = {batch_.get() + static_cast<size_t>(i) * kPacketBuffer, kPacketBuffer};
      batch_msgs_[i] = {};
      batch_msgs_[i].msg_hdr.msg_iov = &batch_iov_[i];
      batch_msgs_[i].msg_hdr.msg_iovlen = 1;
    }
  }

  void OnRegistrationReadable(Registration* r) {
    for (int round = 0; round < kBatch / kMmsg; round++) {
      PrepareBatch();
      int received = recvmmsg(r->fd, batch_msgs_, kMmsg, MSG_DONTWAIT, nullptr);
      if (received < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        Close(r, "error", errno);  // ECONNRESET and friends: this registration ends, the loop carries on
        return;
      }
      // recvmmsg reports EOF as a message of length 0; an empty SOCK_SEQPACKET message cannot be told from EOF
      // by recv(2) either, so both end the registration.
      bool eof = received == 0;
      for (int i = 0; i < received && !eof && !r->closed; i++) {
        const mmsghdr& message = batch_msgs_[i];
        if ((message.msg_hdr.msg_flags & MSG_TRUNC) != 0) {
          r->Drop("truncated");
        } else if (message.msg_len == 0) {
          eof = true;
        } else {
          Egress(r, static_cast<uint8_t*>(batch_iov_[i].iov_base), message.msg_len);
        }
      }
      if (r->closed) return;
      if (eof) {
        Close(r, "eof", 0);
        return;
      }
      if (received < kMmsg) return;
    }
  }

  void Egress(Registration* r, uint8_t* data, size_t size) {
    Packet p;
    Verdict verdict = ip::Parse(data, size, ip::Direction::kEgress, settings_.verify_checksums, &p);
    bool reassembled = false;
    if (verdict == Verdict::kFragment && reassembly::IsFragment(data, size)) {
      // Held until its datagram is complete, which then takes the normal path as one packet.
      reassembly::Result result = egress_fragments_.Add(data, size, r->rid, MonotonicMs(), settings_.verify_checksums,
                                                        assembled_.get(), kPacketBuffer);
      if (!Assembled(result, &r->drops)) return;
      data = assembled_.get();
      size = result.length;
      reassembled = true;
      verdict = ip::Parse(data, size, ip::Direction::kEgress, settings_.verify_checksums, &p);
    }
    if (verdict != Verdict::kOk) {
      r->Drop(ip::VerdictName(verdict));
      return;
    }
    if (!(p.family == 4 ? r->has4 : r->has6)) {
      r->Drop("family");
      Refuse(r, p);
      return;
    }
    uint8_t protocol = ip::FlowProtocol(p);
    int index = IndexOf(protocol);
    if (!r->protocols[index]) {
      r->Drop("denied");
      Refuse(r, p);
      return;
    }
    int64_t now = MonotonicMs();
    Key key = ForwardKey(r->rid, protocol, p.family, p.src(), p.sport(), p.dst(), p.dport());
    Mapping* m = nullptr;
    auto found = forward_.find(key);
    if (found != forward_.end()) {
      m = found->second.get();
      if (now - m->last_activity > settings_.revalidate_after_ms) m = Revalidate(r, m, p);
      if (m == nullptr) return;
    } else {
      // Only a SYN opens a TCP mapping: a port reserved for a mid-stream segment would only draw an RST from
      // the destination, and after a restart the mappings come back through addMappings.
      if (p.kind == Kind::kTcp && (p.tcp_flags() & (packet::kTcpSyn | packet::kTcpAck | packet::kTcpRst)) != packet::kTcpSyn) {
        r->Drop("noMapping");
        return;
      }
      m = Allocate(r, p, key, protocol);
      if (m == nullptr) return;
    }
    ip::RewriteSource(p, m->egress, m->eport);
    if (p.fragmentable()) ip::SetIpv4Id(p, next_ip_id_++);
    if (p.kind == Kind::kTcp && settings_.mss_clamp != 0 && (p.tcp_flags() & packet::kTcpSyn) != 0) {
      packet::TcpSegment segment = p.AsTcp();
      packet::ClampMss(segment, static_cast<uint16_t>(p.family == 4 ? settings_.mss_clamp : settings_.mss_clamp - 20));
    }
    if (reassembled && p.family == 6 && p.length > tun_mtu_) {
      if (!WriteSplit(r, data, p.length)) return;
    } else {
      ssize_t written = write(settings_.tun_fd, data, p.length);
      if (written < 0) {
        r->Drop(errno == EAGAIN || errno == ENOBUFS ? "tunFull" : "tunError");
        return;
      }
      to_tun_++;
    }
    m->packets_out++;
    m->last_activity = now;
    r->packets_out++;
    r->bytes_out += p.length;
  }

  // What a fragment's Add means for the caller: true when `result` holds a complete datagram; otherwise the
  // fragment was held (not a drop) or dropped and counted in `drops`.
  static bool Assembled(const reassembly::Result& result, std::map<std::string, uint64_t>* drops) {
    switch (result.outcome) {
      case reassembly::Outcome::kComplete: return true;
      case reassembly::Outcome::kHeld: return false;
      case reassembly::Outcome::kInvalid: (*drops)[ip::VerdictName(result.verdict)]++; return false;
      case reassembly::Outcome::kDropped: (*drops)[reassembly::DropName(result.drop)] += result.count; return false;
    }
    return false;
  }

  // A reassembled IPv6 datagram too big for the tun leaves as fragments of the tun's MTU with a fresh
  // identification: the client's ID is only unique among its own datagrams, and the kernel never fragments
  // forwarded IPv6 (it would answer the egress address with a packet-too-big). A failed write loses the
  // datagram (its other fragments would only wait at the destination): false, counted.
  bool WriteSplit(Registration* r, const uint8_t* data, size_t length) {
    int err = 0;
    reassembly::SplitIpv6(data, length, tun_mtu_, next_ip6_id_++, split_.get(), [&](const uint8_t* fragment, size_t size) {
      if (err != 0) return;
      if (write(settings_.tun_fd, fragment, size) < 0) {
        err = errno;
        return;
      }
      to_tun_++;
    });
    if (err != 0) r->Drop(err == EAGAIN || err == ENOBUFS ? "tunFull" : "tunError");
    return err == 0;
  }

  // The MTU IPv6 datagrams are split for: the option, or the tun device's (it may change while Fish runs: the
  // control plane sets it when it brings the link up), at least 1280.
  void RefreshTunMtu() {
    if (settings_.tun_mtu != 0) {
      tun_mtu_ = settings_.tun_mtu;
      return;
    }
    ifreq request{};
    if (!ioctl_fd_.valid() || ioctl(settings_.tun_fd, TUNGETIFF, &request) < 0) return;
    if (ioctl(ioctl_fd_.get(), SIOCGIFMTU, &request) == 0 && request.ifr_mtu >= 1280) {
      tun_mtu_ = static_cast<size_t>(request.ifr_mtu);
    }
  }

  // Picks and reserves an egress port for a new flow: ports of the slice in an order that starts at a keyed
  // hash of the flow (RFC 6056 §3.3.3 style: hard to predict, stable for a retransmitted first packet),
  // skipping those this pump already maps toward the same destination, letting conntrack arbitrate the rest.
  Mapping* Allocate(Registration* r, const Packet& p, const Key& key, uint8_t protocol) {
    if (r->max_mappings != 0 && counts_[r->rid] >= r->max_mappings) {
      Exhaust(r, p, "limit", 0);
      return nullptr;
    }
    const uint8_t* egress = r->egress(p.family);
    uint32_t size = static_cast<uint32_t>(r->port_hi) - r->port_lo + 1;
    uint32_t start = static_cast<uint32_t>(Fnv(key.bytes.data(), key.bytes.size(), secret_) % size);
    for (uint32_t i = 0; i < size; i++) {
      uint16_t port = static_cast<uint16_t>(r->port_lo + (start + i) % size);
      Key reverse = ReverseKey(protocol, p.family, egress, port, p.dst(), p.dport());
      if (reverse_.count(reverse) != 0) continue;
      int err = Reserve(r, protocol, p.family, egress, port, p.dst(), p.dport(), p.src(), p.sport());
      if (err == EEXIST) {
        r->collisions++;
        continue;
      }
      if (err != 0) {
        Exhaust(r, p, "conntrack", err);
        return nullptr;
      }
      r->reserved++;
      auto m = std::make_unique<Mapping>();
      m->forward = key;
      m->reverse = reverse;
      m->rid = r->rid;
      m->protocol = protocol;
      m->family = p.family;
      std::memcpy(m->client, p.src(), p.address_size());
      m->client_port = p.sport();
      std::memcpy(m->dst, p.dst(), p.address_size());
      m->dport = p.dport();
      std::memcpy(m->egress, egress, p.address_size());
      m->eport = port;
      m->last_activity = MonotonicMs();
      Mapping* raw = m.get();
      Install(std::move(m));
      return raw;
    }
    Exhaust(r, p, "slice", 0);
    return nullptr;
  }

  // An idle mapping may have lost its conntrack entry (expired, deleted by an operator) and its tuple may since
  // belong to someone else (notes §9). Returns the mapping to use, a new one, or nullptr (packet refused).
  Mapping* Revalidate(Registration* r, Mapping* m, const Packet& p) {
    ctnetlink::Tuple tuple = TupleOf(*m);
    uint8_t message[ctnetlink::kMaxMessage];
    uint32_t seq = ++seq_;
    size_t length = ctnetlink::BuildGet(message, seq, tuple);
    ctnetlink::Answer answer;
    int err = Request(r, message, length, seq, &answer);
    uint32_t mark = settings_.mark_base | r->rid;
    if (err == 0 && (!answer.has_mark || answer.mark == mark)) return m;
    if (err == ENOENT) {
      // Gone: the same port again keeps the flow's tuple, if nobody took it meanwhile.
      err = Reserve(r, m->protocol, m->family, m->egress, m->eport, m->dst, m->dport, m->client, m->client_port);
      if (err == 0) {
        r->reserved++;
        return m;
      }
      if (err == EEXIST) r->collisions++;
    }
    if (err == 0 || err == EEXIST) {
      // Someone else's entry holds the tuple now: the flow moves to another port.
      Key key = m->forward;
      uint8_t protocol = m->protocol;
      Remove(m);
      r->Drop("remapped");
      return Allocate(r, p, key, protocol);
    }
    // The kernel did not answer usefully: keep the flow as it is rather than break it.
    r->Drop("revalidateFailed");
    return m;
  }

  ctnetlink::Tuple TupleOf(const Mapping& m) {
    ctnetlink::Tuple t;
    t.family = m.family;
    t.protocol = m.protocol;
    std::memcpy(t.src, m.egress, 16);
    std::memcpy(t.dst, m.dst, 16);
    t.sport = m.eport;
    t.dport = m.dport;
    return t;
  }

  // The exclusive create of notes §7. Returns 0, EEXIST, or another errno (ETIMEDOUT when the kernel is silent).
  int Reserve(Registration* r, uint8_t protocol, int family, const uint8_t* egress, uint16_t eport,
              const uint8_t* dst, uint16_t dport, const uint8_t* client, uint16_t client_port) {
    ctnetlink::Reservation reservation;
    reservation.orig.family = family;
    reservation.orig.protocol = protocol;
    size_t n = family == 4 ? 4 : 16;
    std::memcpy(reservation.orig.src, egress, n);
    std::memcpy(reservation.orig.dst, dst, n);
    reservation.orig.sport = eport;
    reservation.orig.dport = dport;
    reservation.timeout_s = settings_.reserve_timeout_s[IndexOf(protocol)];
    reservation.mark = settings_.mark_base | r->rid;
    reservation.rid = r->rid;
    reservation.client_port = client_port;
    std::memcpy(reservation.client, client, n);
    uint8_t message[ctnetlink::kMaxMessage];
    uint32_t seq = ++seq_;
    size_t length = ctnetlink::BuildReservation(message, seq, reservation);
    ctnetlink::Answer answer;
    return Request(r, message, length, seq, &answer);
  }

  // One synchronous ctnetlink round trip: send, then read until the ack of `seq` (answers to earlier requests
  // that timed out are skipped by their sequence number). Returns the ack's errno, or the socket's.
  int Request(Registration* r, const uint8_t* message, size_t length, uint32_t seq, ctnetlink::Answer* answer) {
    sockaddr_nl kernel{};
    kernel.nl_family = AF_NETLINK;
    if (sendto(ct_fd_.get(), message, length, MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel) < 0) {
      return errno;
    }
    int64_t deadline = MonotonicMs() + kConntrackTimeoutMs;
    alignas(nlmsghdr) uint8_t reply[8192];
    while (true) {
      ssize_t got = recv(ct_fd_.get(), reply, sizeof reply, MSG_DONTWAIT);
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == ENOBUFS) {
          // Replies were lost (ours may be among them): keep waiting, the deadline bounds it.
          r->Drop("conntrackOverrun");
          continue;
        }
        if (errno != EAGAIN) return errno;
        int64_t left = deadline - MonotonicMs();
        if (left <= 0) {
          r->Drop("conntrackTimeout");
          return ETIMEDOUT;
        }
        pollfd pfd{ct_fd_.get(), POLLIN, 0};
        poll(&pfd, 1, static_cast<int>(left));
        continue;
      }
      ctnetlink::ReadAnswer(reply, static_cast<size_t>(got), seq, answer);
      if (answer->acked) return answer->error;
    }
  }

  // A new flow got no tuple: the client hears it at once (RST to a SYN, administratively prohibited otherwise),
  // and JS hears it at most once per registration per kExhaustedEventMs, with the refusals in between counted.
  void Exhaust(Registration* r, const Packet& p, const char* reason, int err) {
    r->exhausted++;
    r->Drop("exhausted");
    Refuse(r, p);
    Registration::Refusal& refusal = r->last_refusal;
    refusal.protocol = ip::FlowProtocol(p);
    refusal.family = p.family;
    std::memset(refusal.client, 0, 16);
    std::memset(refusal.dst, 0, 16);
    std::memcpy(refusal.client, p.src(), p.address_size());
    std::memcpy(refusal.dst, p.dst(), p.address_size());
    refusal.client_port = p.sport();
    refusal.dport = p.dport();
    refusal.reason = reason;
    refusal.err = err;
    int64_t now = MonotonicMs();
    if (now - r->last_exhausted_event < kExhaustedEventMs) {
      r->suppressed++;
      return;
    }
    EmitExhausted(r, now);
  }

  void EmitExhausted(Registration* r, int64_t now) {
    EventRecord record(EventRecord::kExhausted);
    record.rid = r->rid;
    record.refusal = r->last_refusal;
    record.suppressed = r->suppressed;
    r->suppressed = 0;
    r->last_exhausted_event = now;
    events_->Push(std::move(record));
  }

  // Refusals folded while the rate limit held are reported once it lifts, even if no new refusal comes: the
  // event then describes the latest of them and `suppressed` counts the others.
  void ReportSuppressed(int64_t now) {
    for (auto& [rid, r] : registrations_) {
      if (r->suppressed != 0 && now - r->last_exhausted_event >= kExhaustedEventMs) {
        r->suppressed--;  // the reported refusal itself is not "suppressed"
        EmitExhausted(r.get(), now);
      }
    }
  }

  // Tells the client its packet will not be forwarded: RST|ACK to a SYN, ICMP administratively prohibited to
  // anything else (never to an RST: RFC 9293 forbids answering one).
  void Refuse(Registration* r, const Packet& p) {
    uint8_t reply[ip::kMaxReply];
    size_t length;
    if (p.kind == Kind::kTcp && (p.tcp_flags() & packet::kTcpRst) != 0) return;
    if (p.kind == Kind::kTcp && (p.tcp_flags() & (packet::kTcpSyn | packet::kTcpAck)) == packet::kTcpSyn) {
      length = ip::BuildRst(p, reply);
    } else {
      length = ip::BuildAdminProhibited(p, reply);
    }
    if (send(r->fd, reply, length, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) r->Drop("full");
  }

  // --- return ---

  // A return packet rewritten and waiting in batch_ for its sendmmsg.
  struct Outgoing {
    Registration* registration;
    Mapping* mapping;
    size_t length;
  };

  // Reads up to kMmsg packets from the tun (a tun has no batch read: one read each) into the batch buffers,
  // rewrites them, and sends each run of consecutive packets for one registration with a single sendmmsg.
  void OnTunReadable() {
    for (int round = 0; round < (kBatch * 4) / kMmsg; round++) {
      int count = 0;
      bool drained = false;
      while (count < kMmsg) {
        uint8_t* slot = batch_.get() + static_cast<size_t>(count) * kPacketBuffer;
        ssize_t got = read(settings_.tun_fd, slot, kPacketBuffer);
        if (got < 0) {
          if (errno == EINTR) continue;
          drained = true;
          if (errno == EAGAIN) break;
          int err = errno;
          // The tun is unusable (detached, EBADFD): stop polling it rather than spin, and say so.
          epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, settings_.tun_fd, nullptr);
          tun_watched_ = false;
          Notice(0, "EFDFERRY_TUN", std::string("reading the tun failed: ") + std::strerror(err));
          break;
        }
        if (got == 0) {
          drained = true;
          break;
        }
        from_tun_++;
        // A dropped packet leaves its slot to the next read.
        if (Return(slot, static_cast<size_t>(got), &outgoing_[count])) count++;
      }
      SendReturns(count);
      if (drained) return;
    }
  }

  // Parses and rewrites one packet from the tun; false if it is dropped (and counted).
  bool Return(uint8_t* data, size_t size, Outgoing* out) {
    Packet p;
    // Not verified: a tun without IFF_VNET_HDR hands out complete checksums (notes §5), and the kernel drops
    // what it finds corrupt before forwarding.
    Verdict verdict = ip::Parse(data, size, ip::Direction::kReturn, false, &p);
    if (verdict == Verdict::kFragment && reassembly::IsFragment(data, size)) {
      // Reassembled in place: the datagram replaces the fragment in its batch slot, ready for sendmmsg.
      reassembly::Result result = return_fragments_.Add(data, size, 0, MonotonicMs(), false, data, kPacketBuffer);
      if (!Assembled(result, &return_drops_)) return false;
      size = result.length;
      verdict = ip::Parse(data, size, ip::Direction::kReturn, false, &p);
    }
    if (verdict != Verdict::kOk) {
      return_drops_[ip::VerdictName(verdict)]++;
      return false;
    }
    Key key = p.kind == Kind::kIcmpError
                  ? ReverseKey(ip::InnerFlowProtocol(p), p.family, ip::InnerSrc(p), ip::InnerSport(p), ip::InnerDst(p),
                               ip::InnerDport(p))
                  : ReverseKey(ip::FlowProtocol(p), p.family, p.dst(), p.dport(), p.src(), p.sport());
    auto found = reverse_.find(key);
    if (found == reverse_.end()) {
      return_drops_["unmapped"]++;
      return false;
    }
    Mapping* m = found->second;
    auto registration = registrations_.find(m->rid);
    if (registration == registrations_.end()) {
      return_drops_["noRegistration"]++;
      return false;
    }
    if (p.kind == Kind::kIcmpError) {
      ip::RewriteIcmpErrorReturn(p, m->client, m->client_port);
    } else {
      ip::RewriteDestination(p, m->client, m->client_port);
      if (p.kind == Kind::kTcp && settings_.mss_clamp != 0 &&
          (p.tcp_flags() & (packet::kTcpSyn | packet::kTcpAck)) == (packet::kTcpSyn | packet::kTcpAck)) {
        packet::TcpSegment segment = p.AsTcp();
        packet::ClampMss(segment, static_cast<uint16_t>(p.family == 4 ? settings_.mss_clamp : settings_.mss_clamp - 20));
      }
    }
    *out = {registration->second.get(), m, p.length};
    return true;
  }

  void SendReturns(int count) {
    int64_t now = MonotonicMs();
    int run_start = 0;
    while (run_start < count) {
      Registration* r = outgoing_[run_start].registration;
      int run_end = run_start + 1;
      while (run_end < count && outgoing_[run_end].registration == r) run_end++;
      for (int i = run_start; i < run_end; i++) {
        batch_iov_[i] = {batch_.get() + static_cast<size_t>(i) * kPacketBuffer, outgoing_[i].length};
        batch_msgs_[i] = {};
        batch_msgs_[i].msg_hdr.msg_iov = &batch_iov_[i];
        batch_msgs_[i].msg_hdr.msg_iovlen = 1;
      }
      int next = run_start;
      while (next < run_end) {
        int sent = sendmmsg(r->fd, batch_msgs_ + next, static_cast<unsigned>(run_end - next), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent <= 0) {
          if (sent < 0 && errno == EINTR) continue;
          // Full: the client's stack retransmits. Other errors (the peer went away) surface on the read side.
          r->Drop(errno == EAGAIN || errno == ENOBUFS ? "full" : "sendError");
          next++;
          continue;
        }
        for (int i = next; i < next + sent; i++) {
          Mapping* m = outgoing_[i].mapping;
          m->packets_in++;
          m->last_activity = now;
          r->packets_in++;
          r->bytes_in += outgoing_[i].length;
        }
        // A short count means message next + sent failed; the next call reports why.
        next += sent;
      }
      run_start = run_end;
    }
  }

  std::shared_ptr<Outbox<EventRecord>> events_;
  Settings settings_;
  std::unique_ptr<uint8_t[]> batch_;
  std::unique_ptr<uint8_t[]> assembled_;  // an egress datagram rebuilt from fragments
  std::unique_ptr<uint8_t[]> split_;      // one IPv6 fragment being written
  mmsghdr batch_msgs_[kMmsg];
  iovec batch_iov_[kMmsg];
  Outgoing outgoing_[kMmsg];
  FileDescriptor ct_fd_;
  FileDescriptor ioctl_fd_;
  size_t tun_mtu_ = 1280;
  Tag wake_tag_{Tag::kWake};
  Tag tun_tag_{Tag::kTun};
  bool tun_watched_ = false;
  bool paused_ = false;
  uint64_t secret_ = 0;
  uint16_t next_ip_id_ = 0;
  uint32_t next_ip6_id_ = 0;
  uint32_t seq_ = 0;
  uint64_t from_tun_ = 0, to_tun_ = 0;
  std::map<std::string, uint64_t> return_drops_;
  std::unordered_map<uint16_t, std::unique_ptr<Registration>> registrations_;
  std::vector<std::unique_ptr<Registration>> graveyard_;
  std::unordered_map<Key, std::unique_ptr<Mapping>, KeyHash> forward_;
  std::unordered_map<Key, Mapping*, KeyHash> reverse_;
  std::unordered_map<uint16_t, uint32_t> counts_;
  // After registrations_ and return_drops_, which their drop sinks count into.
  reassembly::Reassembler egress_fragments_;
  reassembly::Reassembler return_fragments_;
};

// ---------------------------------------------------------------------------------------------------------------
// JS conversions.

// A Record<FishProtocol, T> field; every protocol must be present.
Napi::Object RecordField(const Napi::Object& object, const char* name) {
  Napi::Value value = object.Get(name);
  if (!value.IsObject()) throw Napi::TypeError::New(object.Env(), std::string("\"") + name + "\" must be an object");
  return value.As<Napi::Object>();
}

int ProtocolIndexOf(Napi::Env env, const Napi::Value& value) {
  std::string name = value.IsString() ? value.As<Napi::String>().Utf8Value() : "";
  for (int i = 0; i < 3; i++) {
    if (name == kProtocolNames[i]) return i;
  }
  throw Napi::TypeError::New(env, "\"protocol\" must be 'tcp', 'udp' or 'icmp'");
}

Napi::Object MappingObject(Napi::Env env, const Mapping& m) {
  Napi::Object object = Napi::Object::New(env);
  object.Set("rid", m.rid);
  object.Set("protocol", kProtocolNames[IndexOf(m.protocol)]);
  object.Set("family", m.family);
  object.Set("clientAddress", AddressString(m.family, m.client));
  object.Set("clientPort", m.client_port);
  object.Set("destinationAddress", AddressString(m.family, m.dst));
  object.Set("destinationPort", m.dport);
  object.Set("egressAddress", AddressString(m.family, m.egress));
  object.Set("egressPort", m.eport);
  return object;
}

// ---------------------------------------------------------------------------------------------------------------

class FishPump final : public Napi::ObjectWrap<FishPump>, public LoopResource {
 public:
  static Napi::Function DefineClass(Napi::Env env) {
    return ObjectWrap::DefineClass(env, "FishPump",
                                   {
                                       InstanceMethod<&FishPump::AddRegistration>("addRegistration"),
                                       InstanceMethod<&FishPump::RemoveRegistration>("removeRegistration"),
                                       InstanceMethod<&FishPump::AddMappings>("addMappings"),
                                       InstanceMethod<&FishPump::Mappings>("mappings"),
                                       InstanceMethod<&FishPump::Stats>("stats"),
                                       InstanceMethod<&FishPump::Pause>("pause"),
                                       InstanceMethod<&FishPump::Resume>("resume"),
                                       InstanceMethod<&FishPump::Flush>("flush"),
                                       InstanceMethod<&FishPump::Close>("close"),
                                   });
  }

  explicit FishPump(const Napi::CallbackInfo& info)
      : ObjectWrap(info),
        addon_(Fdferry::Of(info.Env())),
        outbox_(std::make_shared<Outbox<EventRecord>>()),
        events_(info.Env(), "fdferry:FishPump", info.This().As<Napi::Object>()) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsFunction()) {
      throw Napi::TypeError::New(env, "createFishPump(options, onEvents)");
    }
    Napi::Object options = info[0].As<Napi::Object>();
    Settings settings;
    settings.tun_fd = static_cast<int>(NumberField(options, "tunFd", -1, 0, 1 << 30));
    settings.mark_base = static_cast<uint32_t>(NumberField(options, "markBase", 0xF15E0000u, 0, 4294967295.0));
    settings.mss_clamp = static_cast<uint16_t>(NumberField(options, "mssClamp", 0, 0, 65535));
    if (settings.mss_clamp != 0 && settings.mss_clamp < 88) {
      // Lowered by 20 for IPv6, and an MSS below 68 (RFC 9293 §3.7.1 minimum IPv4 datagram) makes no sense.
      throw Napi::RangeError::New(env, "\"mssClamp\" must be 0 or at least 88");
    }
    Napi::Object reserve = RecordField(options, "reserveTimeoutS");
    Napi::Object idle = RecordField(options, "idleTimeoutMs");
    for (int i = 0; i < 3; i++) {
      settings.reserve_timeout_s[i] = static_cast<uint32_t>(NumberField(reserve, kProtocolNames[i], settings.reserve_timeout_s[i], 1, 4294967295.0));
      settings.idle_timeout_ms[i] = static_cast<int64_t>(NumberField(idle, kProtocolNames[i], static_cast<double>(settings.idle_timeout_ms[i]), 1, kMaxSafeInteger));
    }
    settings.revalidate_after_ms = static_cast<int64_t>(NumberField(options, "revalidateAfterMs", 5000, 0, kMaxSafeInteger));
    settings.verify_checksums = options.Get("verifyChecksums").ToBoolean();
    settings.fragments.timeout_ms = static_cast<int64_t>(NumberField(options, "fragmentTimeoutMs", 5000, 1, 600000));
    settings.fragments.max_entries = static_cast<size_t>(NumberField(options, "fragmentEntries", 1024, 1, 1 << 20));
    // A quarter each, so that one client's fragments (or one's attack) cannot take the egress table from all.
    settings.fragments.max_scope_entries = std::max<size_t>(1, settings.fragments.max_entries / 4);
    settings.fragments.max_bytes = static_cast<size_t>(NumberField(options, "fragmentBytes", 4 << 20, 65536, 1 << 30));
    settings.tun_mtu = static_cast<uint32_t>(NumberField(options, "tunMtu", 0, 0, 65535));
    if (settings.tun_mtu != 0 && settings.tun_mtu < 1280) throw Napi::RangeError::New(env, "\"tunMtu\" must be 0 or at least 1280");

    // The pump reads the tun until EAGAIN: a blocking tun would stall the thread. Read-modify-write, as the flag
    // lives on the open file description that JS shares.
    if (MakeNonblocking(settings.tun_fd) < 0) throw ErrnoException(env, errno, "fcntl");

    events_.Open<FishPump, &FishPump::DeliverEvents>(addon_, *outbox_, this, info[1].As<Napi::Function>());
    try {
      thread_ = std::make_unique<PumpThread>(outbox_, settings);
    } catch (const std::system_error& error) {
      events_.Close();
      throw ErrnoException(env, error);
    }
    addon_.Register(static_cast<LoopResource*>(this));
    Ref();
  }

  ~FishPump() override { thread_.reset(); }

  void CloseForTeardown() override {
    if (closed_) return;
    closed_ = true;
    thread_.reset();
    events_.Close();
    addon_.Unregister(static_cast<LoopResource*>(this));
    Unref();
  }

 private:
  void CheckOpen(Napi::Env env) {
    if (closed_) throw FdferryError(env, "EFDFERRY_CLOSED", "the fish pump is closed");
  }

  // Runs `fn` on the pump thread; a CommandError it throws becomes a Node-style error here.
  template <typename Result>
  Result OnThread(Napi::Env env, std::function<Result()> fn) {
    try {
      return thread_->Call<Result>(std::move(fn));
    } catch (const CommandError& error) {
      if (error.err != 0) throw ErrnoException(env, error.err, error.syscall);
      throw FdferryError(env, error.code, error.message);
    }
  }

  void AddRegistration(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "addRegistration(registration)");
    Napi::Object object = info[0].As<Napi::Object>();
    auto r = std::make_unique<Registration>();
    r->rid = static_cast<uint16_t>(NumberField(object, "rid", -1, 1, 65535));
    r->fd = static_cast<int>(NumberField(object, "fd", -1, 0, 1 << 30));
    if (!object.Get("egress4").IsNull() && !object.Get("egress4").IsUndefined()) {
      AddressField(object, "egress4", 4, r->egress4);
      r->has4 = true;
    }
    if (!object.Get("egress6").IsNull() && !object.Get("egress6").IsUndefined()) {
      AddressField(object, "egress6", 6, r->egress6);
      r->has6 = true;
    }
    r->port_lo = static_cast<uint16_t>(NumberField(object, "portLo", -1, 1, 65535));
    r->port_hi = static_cast<uint16_t>(NumberField(object, "portHi", -1, 1, 65535));
    if (r->port_hi < r->port_lo) throw Napi::RangeError::New(env, "\"portHi\" must not be below \"portLo\"");
    Napi::Object protocols = RecordField(object, "protocols");
    for (int i = 0; i < 3; i++) r->protocols[i] = protocols.Get(kProtocolNames[i]).ToBoolean();
    r->max_mappings = static_cast<uint32_t>(NumberField(object, "maxMappings", 0, 0, 4294967295.0));
    if (addon_.IsPolled(r->fd)) throw FdferryError(env, "EFDFERRY_INVALID", "the fd is polled by a socket of this addon");
    PumpThread* thread = thread_.get();
    Registration* raw = r.release();
    OnThread<bool>(env, [thread, raw] {
      thread->AddRegistration(std::unique_ptr<Registration>(raw));
      return true;
    });
  }

  Napi::Value RemoveRegistration(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_ || info.Length() < 1 || !info[0].IsNumber()) return Napi::Boolean::New(env, false);
    double rid = info[0].As<Napi::Number>().DoubleValue();
    if (!(rid >= 1 && rid <= 65535)) return Napi::Boolean::New(env, false);
    PumpThread* thread = thread_.get();
    auto id = static_cast<uint16_t>(rid);
    return Napi::Boolean::New(env, OnThread<bool>(env, [thread, id] { return thread->RemoveRegistration(id); }));
  }

  void AddMappings(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "addMappings(mappings)");
    Napi::Array list = info[0].As<Napi::Array>();
    std::vector<Mapping> mappings;
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value value = list.Get(i);
      if (!value.IsObject()) throw Napi::TypeError::New(env, "each mapping must be an object");
      Napi::Object object = value.As<Napi::Object>();
      Mapping m;
      m.rid = static_cast<uint16_t>(NumberField(object, "rid", -1, 1, 65535));
      m.protocol = ProtocolOf(ProtocolIndexOf(env, object.Get("protocol")));
      double family = NumberField(object, "family", 0, 4, 6);
      if (family != 4 && family != 6) throw Napi::RangeError::New(env, "\"family\" must be 4 or 6");
      m.family = static_cast<int>(family);
      AddressField(object, "clientAddress", m.family, m.client);
      m.client_port = static_cast<uint16_t>(NumberField(object, "clientPort", -1, 0, 65535));
      AddressField(object, "destinationAddress", m.family, m.dst);
      m.dport = static_cast<uint16_t>(NumberField(object, "destinationPort", -1, 0, 65535));
      AddressField(object, "egressAddress", m.family, m.egress);
      m.eport = static_cast<uint16_t>(NumberField(object, "egressPort", -1, 0, 65535));
      if (m.protocol == ip::kProtoIcmp && m.dport != 0) throw Napi::RangeError::New(env, "an ICMP mapping has destinationPort 0");
      mappings.push_back(m);
    }
    PumpThread* thread = thread_.get();
    OnThread<bool>(env, [thread, &mappings] {
      thread->AddMappings(std::move(mappings));
      return true;
    });
  }

  Napi::Array RowsArray(Napi::Env env, const std::vector<MappingRow>& rows) {
    Napi::Array list = Napi::Array::New(env, rows.size());
    uint32_t index = 0;
    for (const MappingRow& row : rows) {
      Napi::Object object = MappingObject(env, row.mapping);
      object.Set("packetsOut", static_cast<double>(row.mapping.packets_out));
      object.Set("packetsIn", static_cast<double>(row.mapping.packets_in));
      object.Set("idleMs", static_cast<double>(row.idle_ms));
      list.Set(index++, object);
    }
    return list;
  }

  Napi::Value Mappings(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return Napi::Array::New(env);
    int rid = -1;
    if (info.Length() > 0 && !info[0].IsUndefined()) {
      if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "\"rid\" must be a number");
      rid = info[0].As<Napi::Number>().Int32Value();
    }
    PumpThread* thread = thread_.get();
    return RowsArray(env, OnThread<std::vector<MappingRow>>(env, [thread, rid] { return thread->Rows(rid); }));
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object result = Napi::Object::New(env);
    PumpStats stats{};
    if (!closed_) {
      PumpThread* thread = thread_.get();
      stats = OnThread<PumpStats>(env, [thread] { return thread->Stats(); });
    }
    Napi::Array registrations = Napi::Array::New(env, stats.registrations.size());
    uint32_t index = 0;
    for (const RegistrationStats& s : stats.registrations) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("rid", s.rid);
      object.Set("mappings", static_cast<double>(s.mappings));
      object.Set("packetsOut", static_cast<double>(s.packets_out));
      object.Set("packetsIn", static_cast<double>(s.packets_in));
      object.Set("bytesOut", static_cast<double>(s.bytes_out));
      object.Set("bytesIn", static_cast<double>(s.bytes_in));
      object.Set("reserved", static_cast<double>(s.reserved));
      object.Set("collisions", static_cast<double>(s.collisions));
      object.Set("exhausted", static_cast<double>(s.exhausted));
      object.Set("drops", DropsObject(env, s.drops));
      registrations.Set(index++, object);
    }
    result.Set("registrations", registrations);
    result.Set("returnDrops", DropsObject(env, stats.return_drops));
    result.Set("packetsFromTun", static_cast<double>(stats.from_tun));
    result.Set("packetsToTun", static_cast<double>(stats.to_tun));
    return result;
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    PumpThread* thread = thread_.get();
    auto rows = OnThread<std::vector<MappingRow>>(env, [thread] { return thread->Pause(); });
    // Events raised before the pause are reported before the caller builds its state.
    DeliverEvents();
    return RowsArray(env, rows);
  }

  void Resume(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    PumpThread* thread = thread_.get();
    OnThread<bool>(env, [thread] {
      thread->Resume();
      return true;
    });
  }

  void Flush(const Napi::CallbackInfo&) {
    if (!closed_) DeliverEvents();
  }

  void Close(const Napi::CallbackInfo&) {
    if (closed_) return;
    thread_.reset();
    DeliverEvents();
    CloseForTeardown();
  }

  void DeliverEvents() { events_.Deliver(Value(), EventObject); }

  static Napi::Object EventObject(Napi::Env env, const EventRecord& e) {
    Napi::Object object = Napi::Object::New(env);
    object.Set("rid", e.rid);
    switch (e.kind) {
      case EventRecord::kExhausted: {
        const Registration::Refusal& r = e.refusal;
        object.Set("type", "exhausted");
        object.Set("protocol", kProtocolNames[IndexOf(r.protocol)]);
        object.Set("family", r.family);
        object.Set("clientAddress", AddressString(r.family, r.client));
        object.Set("clientPort", r.client_port);
        object.Set("destinationAddress", AddressString(r.family, r.dst));
        object.Set("destinationPort", r.dport);
        object.Set("reason", r.reason);
        object.Set("code", ErrnoName(env, r.err));
        object.Set("suppressed", static_cast<double>(e.suppressed));
        break;
      }
      case EventRecord::kClosed:
        object.Set("type", "closed");
        object.Set("reason", e.reason);
        object.Set("code", ErrnoName(env, e.err));
        break;
      case EventRecord::kNotice:
        object.Set("type", "notice");
        object.Set("code", e.code);
        object.Set("message", e.message);
        break;
    }
    return object;
  }

  Fdferry& addon_;
  std::shared_ptr<Outbox<EventRecord>> outbox_;
  EngineEvents<EventRecord> events_;
  // Reset (joined) before events_ closes, in the order engine_events.h gives.
  std::unique_ptr<PumpThread> thread_;
  bool closed_ = false;
};

Napi::Value CreateFishPump(const Napi::CallbackInfo& info) {
  return Construct(Fdferry::Of(info.Env()).fishPumpClass, info, 2);
}

}  // namespace

void InitFishPump(Napi::Env env, Napi::Object exports, Fdferry& addon) {
  addon.fishPumpClass = Napi::Persistent(FishPump::DefineClass(env));
  exports.Set("createFishPump", Napi::Function::New(env, CreateFishPump, "createFishPump"));
}

}  // namespace fdferry
