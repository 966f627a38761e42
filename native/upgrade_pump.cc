// Bumblebee's data plane: flow sockets <-> tun with NAT, and the listeners' accept, on one epoll thread.
//
// Man pages: epoll(7), epoll_ctl(2), eventfd(2), unix(7) (SOCK_SEQPACKET, MSG_TRUNC), accept(2), tcp(7)
// (TCP_USER_TIMEOUT, TCP_KEEPIDLE), socket(7) (SO_KEEPALIVE, SO_ERROR). Recipe: notes/bumblebee-kernel.md §4-6.
//
// One upgrade, as the pump sees it:
//   1. `upgrade(flowId, env, fd)`: the flow socket joins epoll. Its first message is PEEKed: unless it is a valid
//      SYN the upgrade is refused with the socket untouched (nothing consumed), so the caller gets back exactly
//      what it sent.
//   2. The SYN gets a slot, i.e. an internal tuple (pool address + port) that no other flow of this environment
//      holds, and is rewritten (src -> internal tuple, dst -> listener) into the tun. The kernel answers.
//   3. The listener's accept() yields a socket whose peer is the internal tuple: arithmetic gives the slot, the
//      slot gives the flow, and the socket goes to JS ("accepted").
//   4. From then on packets are rewritten both ways until the flow socket closes ("ended"); the slot then sits in
//      quarantine for TIME_WAIT before another flow may have it.
// Ownership: the pump borrows flow sockets, tuns and listeners and never closes them (JS owns every fd it knows
// of); it owns only the sockets it accepted until they are delivered, and closes those it cannot match
// ("orphans").
#include "upgrade_pump.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "engine_events.h"
#include "engine_thread.h"
#include "errors.h"
#include "clock.h"
#include "js_fields.h"
#include "packet.h"

namespace fdferry {

namespace {

using packet::TcpSegment;
using packet::Tuple;
using packet::Verdict;

constexpr size_t kPacketBuffer = 64 * 1024;
// Messages read from one flow socket or the tun per wake-up before the others get a turn (level-triggered, so
// whatever is left brings us straight back).
constexpr int kBatch = 64;
// Packets moved per recvmmsg/sendmmsg: one syscall for a run of packets of one flow instead of one each.
constexpr int kMmsg = 16;
constexpr int kTickMs = 100;
constexpr uint32_t kPortsPerAddress = 60000;
constexpr uint16_t kFirstPort = 2000;
// Slots examined per allocation before giving up: bounds the cost of a request when the space is nearly full.
constexpr uint32_t kMaxProbe = 1 << 16;

struct Flow;
struct Environment;

// What an epoll registration points at.
struct Tag {
  enum Kind { kWake, kTun, kListener, kFlow } kind;
  Environment* environment = nullptr;
  Flow* flow = nullptr;
  int fd = -1;
};

struct Flow {
  double id = 0;
  Environment* environment = nullptr;
  int fd = -1;
  uint32_t slot = 0;
  enum State { kWaitingForSyn, kHandshake, kEstablished } state = kWaitingForSyn;
  Tuple client;  // src = the client, dst = where it wanted to go
  int64_t started = 0;
  int64_t last_activity = 0;
  uint64_t packets_in = 0;   // client -> kernel
  uint64_t packets_out = 0;  // kernel -> client
  Tag tag{Tag::kFlow};
  bool ended = false;
};

struct Environment {
  int id = 0;
  int tun_fd = -1;
  int listener4_fd = -1;
  int listener6_fd = -1;
  uint8_t listener4[4] = {};
  uint8_t listener6[16] = {};
  uint16_t listen_port = 0;
  uint32_t pool4 = 0;  // host order
  uint8_t pool6[16] = {};
  uint32_t slots = 0;
  std::vector<Flow*> by_slot;
  std::vector<int64_t> freed_at;  // monotonic ms, 0 = free since start
  std::deque<std::pair<uint32_t, int64_t>> quarantine;  // (slot, freed at), oldest first
  uint32_t cursor = 1;
  uint32_t in_use = 0;
  Tag tun_tag{Tag::kTun};
  Tag listener4_tag{Tag::kListener};
  Tag listener6_tag{Tag::kListener};
  bool accept_blocked = false;  // out of fds: listeners are off epoll until the next tick
  // Counters (read by JS through a synchronous call on the thread, so plain integers).
  uint64_t packets_to_kernel = 0, packets_to_client = 0, bytes_to_kernel = 0, bytes_to_client = 0;
  uint64_t accepted = 0, orphans = 0, pending = 0, flows = 0;
  std::unordered_map<std::string, uint64_t> drops;

  void Drop(const char* reason) { drops[reason]++; }

  // Internal peer of a slot: pool + slot / 60000, port 2000 + slot % 60000.
  void InternalOf(int family, uint32_t slot, uint8_t* address, uint16_t* port) const {
    uint32_t quotient = slot / kPortsPerAddress;
    *port = static_cast<uint16_t>(kFirstPort + slot % kPortsPerAddress);
    if (family == 4) {
      uint32_t value = htonl(pool4 + quotient);
      std::memcpy(address, &value, 4);
    } else {
      std::memcpy(address, pool6, 16);
      uint32_t low;
      std::memcpy(&low, pool6 + 12, 4);
      low = htonl(ntohl(low) + quotient);
      std::memcpy(address + 12, &low, 4);
    }
  }

  // The inverse: 0 when the address is not one of ours.
  uint32_t SlotOf(int family, const uint8_t* address, uint16_t port) const {
    if (port < kFirstPort || port >= kFirstPort + kPortsPerAddress) return 0;
    uint32_t quotient;
    if (family == 4) {
      uint32_t value;
      std::memcpy(&value, address, 4);
      value = ntohl(value);
      if (value < pool4) return 0;
      quotient = value - pool4;
    } else {
      if (std::memcmp(address, pool6, 12) != 0) return 0;
      uint32_t low, base;
      std::memcpy(&low, address + 12, 4);
      std::memcpy(&base, pool6 + 12, 4);
      low = ntohl(low), base = ntohl(base);
      if (low < base) return 0;
      quotient = low - base;
    }
    uint64_t slot = static_cast<uint64_t>(quotient) * kPortsPerAddress + (port - kFirstPort);
    return slot < slots ? static_cast<uint32_t>(slot) : 0;
  }
};

struct PumpSettings {
  uint16_t mss_clamp = 0;
  int64_t flow_idle_timeout_ms = 0;
  int64_t upgrade_timeout_ms = 10000;
  int64_t quarantine_ms = 60000;
  bool verify_checksums = true;
  int keepalive_idle_s = 0, keepalive_interval_s = 0, keepalive_count = 0, user_timeout_ms = 0;
};

// One event for JS. Strings are filled only for the kinds that carry them.
struct PumpEventRecord {
  enum Kind { kAccepted, kRejected, kEnded, kNotice } kind;
  explicit PumpEventRecord(Kind of) : kind(of) {}
  double flow_id = 0;
  int fd = -1;
  uint32_t slot = 0;
  Tuple tuple;
  uint8_t internal[16] = {};
  uint16_t internal_port = 0;
  uint8_t listener[16] = {};
  uint16_t listen_port = 0;
  const char* code = nullptr;
  std::string message;
  const char* reason = nullptr;
  int err = 0;
};

struct PausedFlowRecord {
  double flow_id;
  int environment_id;
  int fd;
  uint32_t slot;
  Tuple tuple;
  uint64_t packets_in, packets_out;
  int64_t idle_ms;
};

struct PausedState {
  std::vector<PausedFlowRecord> flows;
  std::vector<std::tuple<int, uint32_t, int64_t>> quarantine;  // env, slot, age ms
  std::vector<std::pair<int, uint32_t>> cursors;
};

struct EnvironmentStats {
  int id;
  uint64_t flows, pending, quarantined, slots, to_kernel, to_client, bytes_kernel, bytes_client, accepted, orphans;
  std::vector<std::pair<std::string, uint64_t>> drops;
};

struct FlowRow {
  double id;
  int environment_id;
  uint32_t slot;
  bool established;
  Tuple tuple;
  uint64_t packets_in, packets_out;
  int64_t idle_ms;
};

// ---------------------------------------------------------------------------------------------------------------

class PumpThread : public EngineThread {
 public:
  PumpThread(std::shared_ptr<Outbox<PumpEventRecord>> events, PumpSettings settings)
      : EngineThread(&wake_tag_), events_(std::move(events)), settings_(settings), buffer_(new uint8_t[kPacketBuffer]),
        batch_(new uint8_t[kMmsg * kPacketBuffer]) {
    Start([this] { Run(); });
  }

  ~PumpThread() { Stop(); }

  // --- commands (run on the thread) ---

  void AddEnvironment(std::unique_ptr<Environment> environment) {
    Environment* raw = environment.get();
    raw->tun_tag.environment = raw->listener4_tag.environment = raw->listener6_tag.environment = raw;
    raw->tun_tag.fd = raw->tun_fd;
    raw->listener4_tag.fd = raw->listener4_fd;
    raw->listener6_tag.fd = raw->listener6_fd;
    raw->by_slot.assign(raw->slots, nullptr);
    raw->freed_at.assign(raw->slots, 0);
    // Set once on the listeners rather than on every accepted socket: Linux copies keepalive and
    // TCP_USER_TIMEOUT into the sockets a listener accepts (and starts their keepalive timer).
    for (int listener : {raw->listener4_fd, raw->listener6_fd}) {
      if (listener >= 0) Tune(listener);
    }
    environments_[raw->id] = std::move(environment);
    if (!paused_) WatchEnvironment(raw);
  }

  void Upgrade(double flow_id, int environment_id, int fd) {
    auto found = environments_.find(environment_id);
    if (found == environments_.end()) {
      Reject(flow_id, "EFDFERRY_INVALID", "no such environment");
      return;
    }
    auto flow = std::make_unique<Flow>();
    flow->id = flow_id;
    flow->environment = found->second.get();
    flow->fd = fd;
    flow->started = flow->last_activity = MonotonicMs();
    flow->tag.flow = flow.get();
    flow->tag.fd = fd;
    Flow* raw = flow.get();
    flows_[flow_id] = std::move(flow);
    raw->environment->pending++;
    if (!paused_ && !Watch(raw)) return;
    if (!paused_) OnFlowReadable(raw);
  }

  bool End(double flow_id) {
    auto found = flows_.find(flow_id);
    if (found == flows_.end()) return false;
    Flow* flow = found->second.get();
    if (flow->state == Flow::kEstablished) {
      Finish(flow, "cancelled", 0);
    } else {
      Refuse(flow, "EFDFERRY_CANCELLED", "the upgrade was cancelled");
    }
    return true;
  }

  std::vector<FlowRow> Snapshot() {
    std::vector<FlowRow> rows;
    int64_t now = MonotonicMs();
    for (auto& [id, flow] : flows_) {
      rows.push_back({id, flow->environment->id, flow->slot, flow->state == Flow::kEstablished, flow->client,
                      flow->packets_in, flow->packets_out, now - flow->last_activity});
    }
    return rows;
  }

  std::vector<EnvironmentStats> Stats() {
    std::vector<EnvironmentStats> all;
    int64_t now = MonotonicMs();
    for (auto& [id, env] : environments_) {
      ExpireQuarantine(*env, now);
      EnvironmentStats stats{id, env->flows, env->pending, env->quarantine.size(), env->slots - 1,
                             env->packets_to_kernel, env->packets_to_client, env->bytes_to_kernel,
                             env->bytes_to_client, env->accepted, env->orphans, {}};
      for (auto& [reason, count] : env->drops) stats.drops.emplace_back(reason, count);
      all.push_back(std::move(stats));
    }
    std::sort(all.begin(), all.end(), [](const EnvironmentStats& a, const EnvironmentStats& b) { return a.id < b.id; });
    return all;
  }

  // Stops reading every tun, listener and flow socket, and hands the flows out. Upgrades still waiting for their
  // handshake cannot travel (their requests are answered by this process), so they are refused first; the
  // daemon waits for them to settle before it pauses, so this only happens to a request that raced the pause.
  PausedState Pause() {
    PausedState state;
    std::vector<Flow*> pending;
    for (auto& [id, flow] : flows_) {
      if (flow->state != Flow::kEstablished) pending.push_back(flow.get());
    }
    for (Flow* flow : pending) Refuse(flow, "EFDFERRY_BUSY", "Bumblebee is handing over to a new process: retry");
    int64_t now = MonotonicMs();
    for (auto& [id, flow] : flows_) {
      Unwatch(flow.get());
      state.flows.push_back({id, flow->environment->id, flow->fd, flow->slot, flow->client, flow->packets_in,
                             flow->packets_out, now - flow->last_activity});
      flow->environment->by_slot[flow->slot] = nullptr;
      flow->environment->in_use--;
      flow->environment->flows--;
      flow->ended = true;
      graveyard_.push_back(std::move(flow));
    }
    flows_.clear();
    for (auto& [id, env] : environments_) {
      UnwatchEnvironment(env.get());
      ExpireQuarantine(*env, now);
      for (auto& [slot, freed] : env->quarantine) state.quarantine.emplace_back(id, slot, now - freed);
      state.cursors.emplace_back(id, env->cursor);
    }
    paused_ = true;
    return state;
  }

  // Adopts `state` (the same flows after a rollback, or a predecessor's) and starts pumping everything.
  void Resume(PausedState state) {
    int64_t now = MonotonicMs();
    for (auto& [env_id, slot, age] : state.quarantine) {
      auto found = environments_.find(env_id);
      if (found == environments_.end() || slot == 0 || slot >= found->second->slots) continue;
      Environment& env = *found->second;
      int64_t freed = now - std::max<int64_t>(0, age);
      if (env.freed_at[slot] == 0 || env.freed_at[slot] < freed) {
        env.freed_at[slot] = freed;
        env.quarantine.emplace_back(slot, freed);
      }
    }
    for (auto& [env_id, cursor] : state.cursors) {
      auto found = environments_.find(env_id);
      if (found != environments_.end() && cursor >= 1 && cursor < found->second->slots) found->second->cursor = cursor;
    }
    for (auto& [id, env] : environments_) {
      std::sort(env->quarantine.begin(), env->quarantine.end(),
                [](const auto& a, const auto& b) { return a.second < b.second; });
    }
    paused_ = false;
    for (auto& [id, env] : environments_) WatchEnvironment(env.get());
    for (const PausedFlowRecord& record : state.flows) {
      auto found = environments_.find(record.environment_id);
      if (found == environments_.end()) continue;  // validated in JS; a stray record is skipped, not trusted
      Environment& env = *found->second;
      if (record.slot == 0 || record.slot >= env.slots || env.by_slot[record.slot] != nullptr) continue;
      auto flow = std::make_unique<Flow>();
      flow->id = record.flow_id;
      flow->environment = &env;
      flow->fd = record.fd;
      flow->slot = record.slot;
      flow->state = Flow::kEstablished;
      flow->client = record.tuple;
      flow->started = now;
      flow->last_activity = now - std::max<int64_t>(0, record.idle_ms);
      flow->packets_in = record.packets_in;
      flow->packets_out = record.packets_out;
      flow->tag.flow = flow.get();
      flow->tag.fd = record.fd;
      env.by_slot[record.slot] = flow.get();
      env.in_use++;
      env.flows++;
      Flow* raw = flow.get();
      flows_[record.flow_id] = std::move(flow);
      if (Watch(raw)) OnFlowReadable(raw);
    }
  }

 private:
  void Run() {
    epoll_event events[128];
    int64_t next_tick = MonotonicMs() + kTickMs;
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
            if (!paused_) OnTunReadable(*tag->environment);
            break;
          case Tag::kListener:
            if (!paused_) OnListenerReadable(*tag->environment, tag->fd);
            break;
          case Tag::kFlow:
            if (!tag->flow->ended && !paused_) OnFlowReadable(tag->flow);
            break;
        }
      }
      graveyard_.clear();
      if (MonotonicMs() >= next_tick) {
        Tick();
        graveyard_.clear();
        next_tick = MonotonicMs() + kTickMs;
      }
    }
    graveyard_.clear();
  }

  bool Watch(Flow* flow) {
    epoll_event event{};
    event.events = EPOLLIN | EPOLLRDHUP;
    event.data.ptr = &flow->tag;
    if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, flow->fd, &event) < 0) {
      int err = errno;
      if (flow->state == Flow::kEstablished) {
        Finish(flow, "error", err);
      } else {
        Refuse(flow, "EFDFERRY_INVALID", std::string("cannot poll the flow socket: ") + std::strerror(err));
      }
      return false;
    }
    return true;
  }

  void Unwatch(Flow* flow) { epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, flow->fd, nullptr); }

  void WatchEnvironment(Environment* env) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.ptr = &env->tun_tag;
    epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, env->tun_fd, &event);
    if (!env->accept_blocked) WatchListeners(env);
  }

  void WatchListeners(Environment* env) {
    epoll_event event{};
    event.events = EPOLLIN;
    for (Tag* tag : {&env->listener4_tag, &env->listener6_tag}) {
      if (tag->fd < 0) continue;
      event.data.ptr = tag;
      epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, tag->fd, &event);
    }
  }

  void UnwatchListeners(Environment* env) {
    for (int fd : {env->listener4_fd, env->listener6_fd}) {
      if (fd >= 0) epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, fd, nullptr);
    }
  }

  void UnwatchEnvironment(Environment* env) {
    epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, env->tun_fd, nullptr);
    UnwatchListeners(env);
  }

  void Reject(double flow_id, const char* code, std::string message) {
    PumpEventRecord record(PumpEventRecord::kRejected);
    record.flow_id = flow_id;
    record.code = code;
    record.message = std::move(message);
    events_->Push(std::move(record));
  }

  // Takes a flow that never got its socket accepted off the pump and gives its fd back with an error.
  void Refuse(Flow* flow, const char* code, std::string message) {
    Forget(flow);
    Reject(flow->id, code, std::move(message));
  }

  // A flow that was handed out ended: its slot goes to quarantine, its fd back to JS.
  void Finish(Flow* flow, const char* reason, int err) {
    Forget(flow);
    PumpEventRecord record(PumpEventRecord::kEnded);
    record.flow_id = flow->id;
    record.reason = reason;
    record.err = err;
    events_->Push(std::move(record));
  }

  void Forget(Flow* flow) {
    Unwatch(flow);
    Environment& env = *flow->environment;
    if (flow->state == Flow::kEstablished) {
      env.flows--;
    } else {
      env.pending--;
    }
    if (flow->slot != 0) {
      int64_t now = MonotonicMs();
      env.by_slot[flow->slot] = nullptr;
      env.freed_at[flow->slot] = now;
      env.quarantine.emplace_back(flow->slot, now);
      env.in_use--;
    }
    flow->ended = true;
    auto found = flows_.find(flow->id);
    if (found != flows_.end()) {
      graveyard_.push_back(std::move(found->second));
      flows_.erase(found);
    }
  }

  void ExpireQuarantine(Environment& env, int64_t now) {
    while (!env.quarantine.empty() && now - env.quarantine.front().second >= settings_.quarantine_ms) {
      env.quarantine.pop_front();
    }
  }

  // Round-robin over the slot space, skipping slots in use and slots freed less than a TIME_WAIT ago (the
  // kernel may still hold a TIME_WAIT socket for that internal tuple).
  uint32_t AllocateSlot(Environment& env) {
    if (env.in_use + 1 >= env.slots) return 0;
    int64_t now = MonotonicMs();
    uint32_t probes = std::min<uint32_t>(env.slots, kMaxProbe);
    for (uint32_t i = 0; i < probes; i++) {
      uint32_t slot = env.cursor;
      env.cursor = env.cursor + 1 >= env.slots ? 1 : env.cursor + 1;
      if (env.by_slot[slot] != nullptr) continue;
      if (env.freed_at[slot] != 0 && now - env.freed_at[slot] < settings_.quarantine_ms) continue;
      return slot;
    }
    return 0;
  }

  static const char* CodeOf(Verdict verdict) {
    return verdict == Verdict::kNotTcp ? "EFDFERRY_NOTTCP" : "EFDFERRY_MALFORMED";
  }

  // Points message i of the batch at its own 64 KiB buffer.
  void PrepareBatch(int count) {
    for (int i = 0; i < count; i++) {
      batch_iov_[i] = {batch_.get() + static_cast<size_t>(i) * kPacketBuffer, kPacketBuffer};
      batch_msgs_[i] = {};
      batch_msgs_[i].msg_hdr.msg_iov = &batch_iov_[i];
      batch_msgs_[i].msg_hdr.msg_iovlen = 1;
    }
  }

  void OnFlowReadable(Flow* flow) {
    if (flow->state == Flow::kWaitingForSyn && !StartHandshake(flow)) return;
    for (int round = 0; round < kBatch / kMmsg; round++) {
      PrepareBatch(kMmsg);
      int received = recvmmsg(flow->fd, batch_msgs_, kMmsg, MSG_DONTWAIT, nullptr);
      if (received < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        int err = errno;
        if (flow->state == Flow::kEstablished) {
          Finish(flow, "error", err);
        } else {
          Refuse(flow, "EFDFERRY_CLOSED", std::string("the flow socket failed: ") + std::strerror(err));
        }
        return;
      }
      // recvmmsg counts EOF as a message of length 0 (and fills the rest of the batch with more of them). An
      // empty SOCK_SEQPACKET message cannot be told from EOF by recv(2) either, so both end the flow.
      Environment& env = *flow->environment;
      bool closed = received == 0;
      for (int i = 0; i < received && !closed; i++) {
        const mmsghdr& message = batch_msgs_[i];
        if (message.msg_len == 0 && (message.msg_hdr.msg_flags & MSG_TRUNC) == 0) {
          closed = true;
        } else if ((message.msg_hdr.msg_flags & MSG_TRUNC) != 0) {
          env.Drop("truncated");
        } else {
          ToKernel(flow, static_cast<uint8_t*>(batch_iov_[i].iov_base), message.msg_len);
        }
      }
      if (closed) {
        if (flow->state == Flow::kEstablished) {
          Finish(flow, "closed", 0);
        } else {
          Refuse(flow, "EFDFERRY_CLOSED", "the flow socket closed before the handshake completed");
        }
        return;
      }
      flow->last_activity = MonotonicMs();
      if (received < kMmsg) return;  // drained
    }
  }

  // The first message decides: a valid SYN gets a slot, anything else refuses the upgrade without consuming it.
  bool StartHandshake(Flow* flow) {
    ssize_t peeked = recv(flow->fd, buffer_.get(), kPacketBuffer, MSG_DONTWAIT | MSG_PEEK | MSG_TRUNC);
    if (peeked < 0) {
      if (errno == EAGAIN || errno == EINTR) return false;  // nothing yet: the upgrade timeout bounds the wait
      Refuse(flow, "EFDFERRY_CLOSED", std::string("the flow socket failed: ") + std::strerror(errno));
      return false;
    }
    if (peeked == 0) {
      Refuse(flow, "EFDFERRY_CLOSED", "the flow socket closed before its first packet");
      return false;
    }
    if (static_cast<size_t>(peeked) > kPacketBuffer) {
      Refuse(flow, "EFDFERRY_MALFORMED", "the first packet is larger than 64 KiB");
      return false;
    }
    TcpSegment segment;
    Verdict verdict = packet::ParseTcp(buffer_.get(), static_cast<size_t>(peeked), settings_.verify_checksums, &segment);
    if (verdict != Verdict::kOk) {
      Refuse(flow, CodeOf(verdict), std::string("the first packet is not a valid TCP segment (") +
                                        packet::VerdictName(verdict) + ")");
      return false;
    }
    if ((segment.flags & (packet::kTcpSyn | packet::kTcpAck | packet::kTcpRst)) != packet::kTcpSyn) {
      Refuse(flow, "EFDFERRY_NOTSYN", "the first packet is not a SYN (a flow must be handed over before its handshake)");
      return false;
    }
    Environment& env = *flow->environment;
    uint32_t slot = AllocateSlot(env);
    if (slot == 0) {
      env.Drop("slotsExhausted");
      Refuse(flow, "EFDFERRY_SLOTS", "no internal tuple is free in this environment (all in use or in TIME_WAIT quarantine)");
      return false;
    }
    flow->slot = slot;
    flow->client = Tuple::Of(segment);
    flow->state = Flow::kHandshake;
    env.by_slot[slot] = flow;
    env.in_use++;
    return true;
  }

  void ToKernel(Flow* flow, uint8_t* data, size_t size) {
    Environment& env = *flow->environment;
    TcpSegment segment;
    Verdict verdict = packet::ParseTcp(data, size, settings_.verify_checksums, &segment);
    if (verdict != Verdict::kOk) {
      env.Drop(packet::VerdictName(verdict));
      return;
    }
    if (!(Tuple::Of(segment) == flow->client)) {
      env.Drop("wrongTuple");
      return;
    }
    if (settings_.mss_clamp) packet::ClampMss(segment, settings_.mss_clamp);
    uint8_t internal[16];
    uint16_t internal_port;
    env.InternalOf(segment.family, flow->slot, internal, &internal_port);
    packet::Rewrite(segment, internal, internal_port, segment.family == 4 ? env.listener4 : env.listener6,
                    env.listen_port);
    ssize_t written = write(env.tun_fd, data, segment.length);
    if (written < 0) {
      env.Drop(errno == EAGAIN ? "tunFull" : "tunError");
      return;
    }
    flow->packets_in++;
    env.packets_to_kernel++;
    env.bytes_to_kernel += segment.length;
  }

  // Reads up to kMmsg packets from the tun (one read each: a tun has no batch read), rewrites them, and sends
  // each run of consecutive packets of one flow with a single sendmmsg.
  void OnTunReadable(Environment& env) {
    for (int round = 0; round < (kBatch * 4) / kMmsg; round++) {
      Flow* owners[kMmsg];
      int count = 0;
      bool drained = false;
      PrepareBatch(kMmsg);
      while (count < kMmsg) {
        uint8_t* data = batch_.get() + static_cast<size_t>(count) * kPacketBuffer;
        ssize_t size = read(env.tun_fd, data, kPacketBuffer);
        if (size < 0) {
          if (errno == EINTR) continue;
          drained = true;  // EAGAIN, or the tun is gone (its fds are JS's: the daemon notices and reports)
          break;
        }
        TcpSegment segment;
        // The kernel's own packets carry valid checksums (verified in the note): no need to pay for a re-sum.
        Verdict verdict = packet::ParseTcp(data, static_cast<size_t>(size), false, &segment);
        if (verdict != Verdict::kOk) {
          env.Drop(verdict == Verdict::kNotTcp ? "kernelNotTcp" : "kernelMalformed");
          continue;
        }
        uint32_t slot = segment.sport() == env.listen_port ? env.SlotOf(segment.family, segment.dst(), segment.dport()) : 0;
        Flow* flow = slot != 0 ? env.by_slot[slot] : nullptr;
        if (flow == nullptr || flow->client.family != segment.family) {
          env.Drop("unknownSlot");
          continue;
        }
        if (settings_.mss_clamp) packet::ClampMss(segment, settings_.mss_clamp);
        packet::Rewrite(segment, flow->client.dst, flow->client.dport, flow->client.src, flow->client.sport);
        batch_iov_[count].iov_len = segment.length;
        owners[count++] = flow;
      }
      SendRuns(env, owners, count);
      if (drained) return;
    }
  }

  void SendRuns(Environment& env, Flow* const* owners, int count) {
    int64_t now = count > 0 ? MonotonicMs() : 0;
    for (int start = 0; start < count;) {
      Flow* flow = owners[start];
      int end = start + 1;
      while (end < count && owners[end] == flow) end++;
      int run = end - start;
      int sent = sendmmsg(flow->fd, batch_msgs_ + start, static_cast<unsigned>(run), MSG_DONTWAIT | MSG_NOSIGNAL);
      // A full socket drops like a router would: TCP retransmits. A closed one shows up as EOF on its side.
      if (sent < 0) {
        const char* reason = errno == EAGAIN ? "socketFull" : "socketError";
        for (int i = 0; i < run; i++) env.Drop(reason);
        sent = 0;
      } else {
        for (int i = sent; i < run; i++) env.Drop("socketFull");
      }
      for (int i = start; i < start + sent; i++) env.bytes_to_client += batch_iov_[i].iov_len;
      flow->packets_out += static_cast<uint64_t>(sent);
      env.packets_to_client += static_cast<uint64_t>(sent);
      if (sent > 0) flow->last_activity = now;
      start = end;
    }
  }

  void OnListenerReadable(Environment& env, int listener) {
    for (int i = 0; i < kBatch; i++) {
      sockaddr_storage peer{};
      socklen_t length = sizeof peer;
      // Blocking, as the requester expects an ordinary socket (O_NONBLOCK would be shared with it).
      int fd = accept4(listener, reinterpret_cast<sockaddr*>(&peer), &length, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // The connection stays in the backlog; stop polling the listeners (level-triggered would spin) and
          // look again on the next tick.
          int err = errno;
          env.Drop("acceptFdExhaustion");
          env.accept_blocked = true;
          UnwatchListeners(&env);
          // Said once per interval, not once per retry: the daemon logs it so an operator sees the limit.
          int64_t now = MonotonicMs();
          if (now - last_exhaustion_notice_ >= 10000) {
            last_exhaustion_notice_ = now;
            PumpEventRecord notice(PumpEventRecord::kNotice);
            notice.code = err == EMFILE ? "EMFILE" : err == ENFILE ? "ENFILE" : err == ENOBUFS ? "ENOBUFS" : "ENOMEM";
            notice.message = "out of file descriptors: handshakes wait in the listen backlog until fds free up";
            notice.err = err;
            events_->Push(std::move(notice));
          }
        }
        return;
      }
      uint32_t slot = 0;
      if (peer.ss_family == AF_INET) {
        auto* in = reinterpret_cast<sockaddr_in*>(&peer);
        slot = env.SlotOf(4, reinterpret_cast<uint8_t*>(&in->sin_addr), ntohs(in->sin_port));
      } else if (peer.ss_family == AF_INET6) {
        auto* in6 = reinterpret_cast<sockaddr_in6*>(&peer);
        slot = env.SlotOf(6, in6->sin6_addr.s6_addr, ntohs(in6->sin6_port));
      }
      Flow* flow = slot != 0 ? env.by_slot[slot] : nullptr;
      if (flow == nullptr || flow->state != Flow::kHandshake) {
        env.orphans++;
        close(fd);
        continue;
      }
      flow->state = Flow::kEstablished;
      env.pending--;
      env.flows++;
      env.accepted++;
      PumpEventRecord record(PumpEventRecord::kAccepted);
      record.flow_id = flow->id;
      record.fd = fd;
      record.slot = slot;
      record.tuple = flow->client;
      env.InternalOf(flow->client.family, slot, record.internal, &record.internal_port);
      std::memcpy(record.listener, flow->client.family == 4 ? env.listener4 : env.listener6, flow->client.family == 4 ? 4 : 16);
      record.listen_port = env.listen_port;
      events_->Push(std::move(record));
    }
  }

  // Keepalive and TCP_USER_TIMEOUT (on a listener, inherited by what it accepts): if Bumblebee dies, its tun goes
  // with it and nothing would ever tell a quiet socket; these make it fail within a bounded time instead.
  void Tune(int fd) {
    if (settings_.keepalive_idle_s > 0) {
      int on = 1;
      setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &settings_.keepalive_idle_s, sizeof(int));
      if (settings_.keepalive_interval_s > 0) {
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &settings_.keepalive_interval_s, sizeof(int));
      }
      if (settings_.keepalive_count > 0) setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &settings_.keepalive_count, sizeof(int));
    }
    if (settings_.user_timeout_ms > 0) {
      setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &settings_.user_timeout_ms, sizeof(int));
    }
  }

  void Tick() {
    if (paused_) return;
    int64_t now = MonotonicMs();
    std::vector<Flow*> expired;
    for (auto& [id, flow] : flows_) {
      if (flow->state != Flow::kEstablished) {
        if (now - flow->started >= settings_.upgrade_timeout_ms) expired.push_back(flow.get());
      } else if (settings_.flow_idle_timeout_ms > 0 && now - flow->last_activity >= settings_.flow_idle_timeout_ms) {
        expired.push_back(flow.get());
      }
    }
    for (Flow* flow : expired) {
      if (flow->state == Flow::kEstablished) {
        Finish(flow, "idle-timeout", 0);
      } else {
        Refuse(flow, "EFDFERRY_TIMEOUT", "the kernel did not complete the handshake in time");
      }
    }
    for (auto& [id, env] : environments_) {
      ExpireQuarantine(*env, now);
      if (env->accept_blocked) {
        env->accept_blocked = false;
        WatchListeners(env.get());
      }
    }
  }

  std::shared_ptr<Outbox<PumpEventRecord>> events_;
  PumpSettings settings_;
  std::unique_ptr<uint8_t[]> buffer_;
  // kMmsg packet buffers and the headers that point at them, for recvmmsg and sendmmsg.
  std::unique_ptr<uint8_t[]> batch_;
  mmsghdr batch_msgs_[kMmsg];
  iovec batch_iov_[kMmsg];
  Tag wake_tag_{Tag::kWake};
  bool paused_ = false;
  int64_t last_exhaustion_notice_ = -10000;
  std::unordered_map<int, std::unique_ptr<Environment>> environments_;
  std::unordered_map<double, std::unique_ptr<Flow>> flows_;
  // Flows ended in the middle of an epoll batch: later events of the batch may still point at them.
  std::vector<std::unique_ptr<Flow>> graveyard_;
};

// ---------------------------------------------------------------------------------------------------------------
// JS conversions.

Napi::Object TupleObject(Napi::Env env, const Tuple& tuple) {
  Napi::Object object = Napi::Object::New(env);
  object.Set("family", tuple.family);
  object.Set("clientAddress", AddressString(tuple.family, tuple.src));
  object.Set("clientPort", tuple.sport);
  object.Set("destinationAddress", AddressString(tuple.family, tuple.dst));
  object.Set("destinationPort", tuple.dport);
  return object;
}

Tuple TupleFrom(const Napi::Object& object) {
  Tuple tuple;
  double family = NumberField(object, "family", 0, 4, 6);
  if (family != 4 && family != 6) throw Napi::RangeError::New(object.Env(), "\"family\" must be 4 or 6");
  tuple.family = static_cast<uint8_t>(family);
  AddressField(object, "clientAddress", tuple.family, tuple.src);
  AddressField(object, "destinationAddress", tuple.family, tuple.dst);
  tuple.sport = static_cast<uint16_t>(NumberField(object, "clientPort", 0, 0, 65535));
  tuple.dport = static_cast<uint16_t>(NumberField(object, "destinationPort", 0, 0, 65535));
  return tuple;
}

// ---------------------------------------------------------------------------------------------------------------

class UpgradePump final : public Napi::ObjectWrap<UpgradePump>, public LoopResource {
 public:
  static Napi::Function DefineClass(Napi::Env env) {
    return ObjectWrap::DefineClass(env, "UpgradePump",
                                   {
                                       InstanceMethod<&UpgradePump::AddEnvironment>("addEnvironment"),
                                       InstanceMethod<&UpgradePump::Upgrade>("upgrade"),
                                       InstanceMethod<&UpgradePump::End>("end"),
                                       InstanceMethod<&UpgradePump::Snapshot>("snapshot"),
                                       InstanceMethod<&UpgradePump::Stats>("stats"),
                                       InstanceMethod<&UpgradePump::Pause>("pause"),
                                       InstanceMethod<&UpgradePump::Resume>("resume"),
                                       InstanceMethod<&UpgradePump::Flush>("flush"),
                                       InstanceMethod<&UpgradePump::Close>("close"),
                                   });
  }

  explicit UpgradePump(const Napi::CallbackInfo& info)
      : ObjectWrap(info),
        addon_(Fdferry::Of(info.Env())),
        outbox_(std::make_shared<Outbox<PumpEventRecord>>()),
        events_(info.Env(), "fdferry:UpgradePump", info.This().As<Napi::Object>()) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsFunction()) {
      throw Napi::TypeError::New(env, "createUpgradePump(options, onEvents)");
    }
    Napi::Object options = info[0].As<Napi::Object>();
    PumpSettings settings;
    settings.mss_clamp = static_cast<uint16_t>(NumberField(options, "mssClamp", 0, 0, 65535));
    settings.flow_idle_timeout_ms = static_cast<int64_t>(NumberField(options, "flowIdleTimeoutMs", 0, 0, kMaxSafeInteger));
    settings.upgrade_timeout_ms = static_cast<int64_t>(NumberField(options, "upgradeTimeoutMs", 10000, 1, kMaxSafeInteger));
    settings.quarantine_ms = static_cast<int64_t>(NumberField(options, "slotQuarantineMs", 60000, 0, kMaxSafeInteger));
    settings.verify_checksums = options.Get("verifyChecksums").ToBoolean();
    settings.keepalive_idle_s = static_cast<int>(NumberField(options, "keepaliveIdleS", 0, 0, 32767));
    settings.keepalive_interval_s = static_cast<int>(NumberField(options, "keepaliveIntervalS", 0, 0, 32767));
    settings.keepalive_count = static_cast<int>(NumberField(options, "keepaliveCount", 0, 0, 127));
    settings.user_timeout_ms = static_cast<int>(NumberField(options, "userTimeoutMs", 0, 0, 2147483647));
    events_.Open<UpgradePump, &UpgradePump::DeliverEvents>(addon_, *outbox_, this, info[1].As<Napi::Function>());
    try {
      thread_ = std::make_unique<PumpThread>(outbox_, settings);
    } catch (const std::system_error& error) {
      events_.Close();
      throw ErrnoException(env, error);
    }
    addon_.Register(static_cast<LoopResource*>(this));
    Ref();
  }

  ~UpgradePump() override { thread_.reset(); }

  void CloseForTeardown() override {
    if (closed_) return;
    closed_ = true;
    thread_.reset();
    // Sockets accepted but never delivered would leak: nobody else knows their numbers.
    for (auto& record : events_.Close()) {
      if (record.fd >= 0) close(record.fd);
    }
    addon_.Unregister(static_cast<LoopResource*>(this));
    Unref();
  }

 private:
  void CheckOpen(Napi::Env env) {
    if (closed_) throw FdferryError(env, "EFDFERRY_CLOSED", "the upgrade pump is closed");
  }

  void AddEnvironment(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "addEnvironment(environment)");
    Napi::Object object = info[0].As<Napi::Object>();
    auto environment = std::make_unique<Environment>();
    environment->id = static_cast<int>(NumberField(object, "id", -1, 0, 1 << 20));
    environment->tun_fd = static_cast<int>(NumberField(object, "tunFd", -1, 0, 1 << 30));
    environment->listener4_fd = static_cast<int>(NumberField(object, "listener4Fd", -1, -1, 1 << 30));
    environment->listener6_fd = static_cast<int>(NumberField(object, "listener6Fd", -1, -1, 1 << 30));
    AddressField(object, "listener4", 4, environment->listener4);
    AddressField(object, "listener6", 6, environment->listener6);
    environment->listen_port = static_cast<uint16_t>(NumberField(object, "listenPort", 0, 1, 65535));
    uint32_t pool4;
    AddressField(object, "pool4", 4, reinterpret_cast<uint8_t*>(&pool4));
    environment->pool4 = ntohl(pool4);
    AddressField(object, "pool6", 6, environment->pool6);
    environment->slots = static_cast<uint32_t>(NumberField(object, "slots", 0, 2, 1 << 24));
    thread_->Post([thread = thread_.get(), raw = environment.release()] { thread->AddEnvironment(std::unique_ptr<Environment>(raw)); });
  }

  void Upgrade(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 3 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber()) {
      throw Napi::TypeError::New(env, "upgrade(flowId, environmentId, fd)");
    }
    double flow_id = info[0].As<Napi::Number>().DoubleValue();
    int environment_id = info[1].As<Napi::Number>().Int32Value();
    int fd = info[2].As<Napi::Number>().Int32Value();
    thread_->Post([thread = thread_.get(), flow_id, environment_id, fd] { thread->Upgrade(flow_id, environment_id, fd); });
  }

  Napi::Value End(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_ || info.Length() < 1 || !info[0].IsNumber()) return Napi::Boolean::New(env, false);
    double flow_id = info[0].As<Napi::Number>().DoubleValue();
    PumpThread* thread = thread_.get();
    return Napi::Boolean::New(env, thread->Call<bool>([thread, flow_id] { return thread->End(flow_id); }));
  }

  Napi::Value Snapshot(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array rows = Napi::Array::New(env);
    if (closed_) return rows;
    PumpThread* thread = thread_.get();
    auto snapshot = thread->Call<std::vector<FlowRow>>([thread] { return thread->Snapshot(); });
    uint32_t index = 0;
    for (const FlowRow& row : snapshot) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("flowId", row.id);
      object.Set("environmentId", row.environment_id);
      object.Set("slot", row.slot);
      object.Set("state", row.established ? "established" : "handshake");
      object.Set("tuple", TupleObject(env, row.tuple));
      object.Set("packetsIn", static_cast<double>(row.packets_in));
      object.Set("packetsOut", static_cast<double>(row.packets_out));
      object.Set("idleMs", static_cast<double>(row.idle_ms));
      rows.Set(index++, object);
    }
    return rows;
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array list = Napi::Array::New(env);
    if (closed_) return list;
    PumpThread* thread = thread_.get();
    auto all = thread->Call<std::vector<EnvironmentStats>>([thread] { return thread->Stats(); });
    uint32_t index = 0;
    for (const EnvironmentStats& s : all) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("id", s.id);
      object.Set("flows", static_cast<double>(s.flows));
      object.Set("pending", static_cast<double>(s.pending));
      object.Set("slotsInQuarantine", static_cast<double>(s.quarantined));
      object.Set("slots", static_cast<double>(s.slots));
      object.Set("packetsToKernel", static_cast<double>(s.to_kernel));
      object.Set("packetsToClient", static_cast<double>(s.to_client));
      object.Set("bytesToKernel", static_cast<double>(s.bytes_kernel));
      object.Set("bytesToClient", static_cast<double>(s.bytes_client));
      object.Set("accepted", static_cast<double>(s.accepted));
      object.Set("orphans", static_cast<double>(s.orphans));
      object.Set("drops", DropsObject(env, s.drops));
      list.Set(index++, object);
    }
    return list;
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    PumpThread* thread = thread_.get();
    PausedState state = thread->Call<PausedState>([thread] { return thread->Pause(); });
    // Refusals made by the pause itself are reported before the caller builds its state.
    DeliverEvents();
    Napi::Object result = Napi::Object::New(env);
    Napi::Array flows = Napi::Array::New(env, state.flows.size());
    uint32_t index = 0;
    for (const PausedFlowRecord& record : state.flows) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("flowId", record.flow_id);
      object.Set("environmentId", record.environment_id);
      object.Set("fd", record.fd);
      object.Set("slot", record.slot);
      object.Set("tuple", TupleObject(env, record.tuple));
      object.Set("packetsIn", static_cast<double>(record.packets_in));
      object.Set("packetsOut", static_cast<double>(record.packets_out));
      object.Set("idleMs", static_cast<double>(record.idle_ms));
      flows.Set(index++, object);
    }
    result.Set("flows", flows);
    Napi::Array quarantine = Napi::Array::New(env, state.quarantine.size());
    index = 0;
    for (auto& [env_id, slot, age] : state.quarantine) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("environmentId", env_id);
      object.Set("slot", slot);
      object.Set("ageMs", static_cast<double>(age));
      quarantine.Set(index++, object);
    }
    result.Set("quarantine", quarantine);
    Napi::Array cursors = Napi::Array::New(env, state.cursors.size());
    index = 0;
    for (auto& [env_id, next] : state.cursors) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("environmentId", env_id);
      object.Set("next", next);
      cursors.Set(index++, object);
    }
    result.Set("cursors", cursors);
    return result;
  }

  void Resume(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "resume(pausedPump)");
    Napi::Object object = info[0].As<Napi::Object>();
    PausedState state;
    auto list = [&](const char* name) {
      Napi::Value value = object.Get(name);
      if (!value.IsArray()) throw Napi::TypeError::New(env, std::string("\"") + name + "\" must be an array");
      return value.As<Napi::Array>();
    };
    Napi::Array flows = list("flows");
    for (uint32_t i = 0; i < flows.Length(); i++) {
      Napi::Value value = flows.Get(i);
      if (!value.IsObject()) throw Napi::TypeError::New(env, "each flow must be an object");
      Napi::Object flow = value.As<Napi::Object>();
      Napi::Value tuple = flow.Get("tuple");
      if (!tuple.IsObject()) throw Napi::TypeError::New(env, "\"tuple\" must be an object");
      state.flows.push_back({NumberField(flow, "flowId", 0, 0, kMaxSafeInteger),
                             static_cast<int>(NumberField(flow, "environmentId", 0, 0, 1 << 20)),
                             static_cast<int>(NumberField(flow, "fd", -1, 0, 1 << 30)),
                             static_cast<uint32_t>(NumberField(flow, "slot", 0, 1, 1 << 24)),
                             TupleFrom(tuple.As<Napi::Object>()),
                             static_cast<uint64_t>(NumberField(flow, "packetsIn", 0, 0, kMaxSafeInteger)),
                             static_cast<uint64_t>(NumberField(flow, "packetsOut", 0, 0, kMaxSafeInteger)),
                             static_cast<int64_t>(NumberField(flow, "idleMs", 0, 0, kMaxSafeInteger))});
    }
    Napi::Array quarantine = list("quarantine");
    for (uint32_t i = 0; i < quarantine.Length(); i++) {
      Napi::Object entry = quarantine.Get(i).As<Napi::Object>();
      state.quarantine.emplace_back(static_cast<int>(NumberField(entry, "environmentId", 0, 0, 1 << 20)),
                                    static_cast<uint32_t>(NumberField(entry, "slot", 0, 0, 1 << 24)),
                                    static_cast<int64_t>(NumberField(entry, "ageMs", 0, 0, kMaxSafeInteger)));
    }
    Napi::Array cursors = list("cursors");
    for (uint32_t i = 0; i < cursors.Length(); i++) {
      Napi::Object entry = cursors.Get(i).As<Napi::Object>();
      state.cursors.emplace_back(static_cast<int>(NumberField(entry, "environmentId", 0, 0, 1 << 20)),
                                 static_cast<uint32_t>(NumberField(entry, "next", 1, 1, 1 << 24)));
    }
    PumpThread* thread = thread_.get();
    thread->Call<bool>([thread, &state] {
      thread->Resume(std::move(state));
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

  static Napi::Object EventObject(Napi::Env env, const PumpEventRecord& e) {
    Napi::Object object = Napi::Object::New(env);
    object.Set("flowId", e.flow_id);
    switch (e.kind) {
      case PumpEventRecord::kAccepted: {
        object.Set("type", "accepted");
        object.Set("fd", e.fd);
        object.Set("slot", e.slot);
        object.Set("tuple", TupleObject(env, e.tuple));
        Napi::Object internal = Napi::Object::New(env);
        internal.Set("address", AddressString(e.tuple.family, e.internal));
        internal.Set("port", e.internal_port);
        internal.Set("listenerAddress", AddressString(e.tuple.family, e.listener));
        internal.Set("listenerPort", e.listen_port);
        object.Set("internal", internal);
        break;
      }
      case PumpEventRecord::kRejected:
        object.Set("type", "rejected");
        object.Set("code", e.code);
        object.Set("message", e.message);
        break;
      case PumpEventRecord::kNotice:
        object.Set("type", "notice");
        object.Set("code", e.code);
        object.Set("message", e.message);
        break;
      case PumpEventRecord::kEnded:
        object.Set("type", "ended");
        object.Set("reason", e.reason);
        object.Set("errno", e.err);
        object.Set("code", ErrnoName(env, e.err));
        break;
    }
    return object;
  }

  Fdferry& addon_;
  std::shared_ptr<Outbox<PumpEventRecord>> outbox_;
  EngineEvents<PumpEventRecord> events_;
  // Reset (joined) before events_ closes, in the order engine_events.h gives.
  std::unique_ptr<PumpThread> thread_;
  bool closed_ = false;
};

Napi::Value CreateUpgradePump(const Napi::CallbackInfo& info) {
  return Construct(Fdferry::Of(info.Env()).upgradePumpClass, info, 2);
}

}  // namespace

void InitUpgradePump(Napi::Env env, Napi::Object exports, Fdferry& addon) {
  addon.upgradePumpClass = Napi::Persistent(UpgradePump::DefineClass(env));
  exports.Set("createUpgradePump", Napi::Function::New(env, CreateUpgradePump, "createUpgradePump"));
}

}  // namespace fdferry
