// The on-ramp demultiplexer: a client-side tun split into one SOCK_SEQPACKET socket per TCP flow, and back;
// optionally with a catch-all sink socket for everything else (or for everything).
//
// Man pages: unix(7) (SOCK_SEQPACKET), socketpair(2), socket(7) (SO_SNDBUFFORCE, SO_RCVBUFFORCE), epoll(7),
// epoll_ctl(2), recvmsg(2) (MSG_TRUNC), send(2) (MSG_DONTWAIT, MSG_NOSIGNAL), read(2), write(2), fcntl(2),
// inet_ntop(3), clock_gettime(2). Kernel docs: networking/tuntap.rst. Recipe: notes/bumblebee-kernel.md §6 (flow
// sockets) and §9 (test topology). The thread's start and stop and the way new flows reach JS are the engines'
// shared ones: engine_thread.h and engine_events.h, which cite eventfd(2), pthread_sigmask(3) and uv_async_t.
//
// What it does, on one epoll thread:
//   tun -> flows   read(tun) one packet at a time; parse it as TCP; key it by its tuple (client -> destination).
//                  A SYN without ACK for an unknown tuple opens a flow: a socketpair, the SYN written into our
//                  end, the other end handed to JS (which passes it to Bumblebee). Known tuple: send() into our
//                  end. Anything else is dropped and counted by reason.
//   flows -> tun   each message from our end of a flow socket is one IP packet for the client: write(tun).
//   tun -> sink    with a sink (options.sinkFd): every packet not demultiplexed above -- anything that does not
//                  parse as TCP (UDP, ICMP, fragments, malformed), or every packet at all when demultiplexTcp is
//                  false -- is send() into the sink as one message, unparsed. This is what a Fish registration
//                  wants: one socket carrying all of a client's raw IP packets (notes/fish-kernel.md §1, §10).
//   sink -> tun    each message from the sink is one IP packet for the client: write(tun), unchecked (the sink's
//                  peer is the harness's trusted counterpart, and it may legitimately send any protocol).
//   ending         FIN seen both ways, or an RST either way, closes our end closeDelayMs later (the last ACKs
//                  and a retransmitted FIN still pass meanwhile); an idle timeout, EOF or an error close it at
//                  once. Closing our end is how Bumblebee learns that the flow is over (recv() == 0).
//   pause/resume   pause() stops the thread without closing anything and hands out our end of every flow with
//                  its tracking state (and the Bumblebee ends still in the outbox), so that an application can
//                  hand its on-ramp to a successor process: the successor creates an on-ramp on the same tun with
//                  `flows` (and `nextFlowId`) in its options, or resume() restarts this one (a rolled-back
//                  hand-over). Packets that arrive meanwhile wait in the tun's queue and in the flow sockets.
//
// Threads and ownership
// - The loop thread owns every flow and our end of every flow socket: only it touches them, so the data path
//   takes no locks. Counters are atomics that JS reads without asking the thread.
// - The on-ramp borrows the tun fd (the caller closes it after close()) but sets O_NONBLOCK on it: a tun is not
//   a socket, so MSG_DONTWAIT is not available on read(2).
// - The on-ramp borrows the sink too, and never closes it. It is left blocking (every call on it passes
//   MSG_DONTWAIT instead), since its open file description may be shared with the caller. Its buffers are raised
//   like a flow socket's: it carries every flow of the client at once. EOF or an error on it stops reading it
//   (counted) but never stops the loop: the tun and the flows keep running.
// - New flows travel to JS through the engines' outbox (engine_events.h), so a burst of connects costs one JS
//   call. From the moment a record is in the outbox the other end of its pair is JS's; records that never
//   reached JS are closed here when the on-ramp is closed first, and handed out by pause() when it is paused.
// - pause() and resume() replace the loop (one EngineThread each run) but keep the outbox and its async handle,
//   which live as long as the JS object. Close order: engine_events.h.
#include "onramp.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine_events.h"
#include "engine_thread.h"
#include "errors.h"
#include "clock.h"
#include "js_fields.h"
#include "fd.h"
#include "packet.h"

namespace fdferry {

namespace {

using packet::TcpSegment;
using packet::Tuple;
using packet::TupleHash;
using packet::Verdict;

// One IP packet: the largest IPv4/IPv6 total length fits, so MSG_TRUNC can only mean a bad peer.
constexpr size_t kPacketBufferSize = 64 * 1024;
// Packets read from the tun per wakeup before the flow sockets get their turn.
constexpr int kTunBatch = 256;
// Messages taken from one flow socket per wakeup (level-triggered: the rest comes on the next round).
constexpr int kFlowBatch = 64;
// Messages taken from the sink per wakeup: it carries every flow of the client, so more than one flow socket.
constexpr int kSinkBatch = 256;
// Granularity of the close delay and the idle timeout.
constexpr int kTimerTickMs = 100;
// Both ends of each flow socket (§6: the sender's sndbuf is the limit; the default holds about 93 packets).
constexpr int kFlowSocketBuffer = 4 * 1024 * 1024;

// Drop counters. The first six are the parser's verdicts, named by packet::VerdictName.
enum Drop : size_t {
  kDropTruncated,
  kDropBadVersion,
  kDropBadHeader,
  kDropFragment,
  kDropNotTcp,
  kDropBadChecksum,
  kDropNoFlow,        // tun: a non-SYN for a tuple with no flow
  kDropSocketFull,    // tun -> flow: send() EAGAIN
  kDropSocketError,   // tun -> flow: any other send() error (the peer is gone; its EOF closes the flow)
  kDropFlowSetup,     // tun: a SYN that could not open a flow (socketpair or epoll_ctl failed, e.g. EMFILE)
  kDropOversize,      // flow -> tun: a message longer than any IP packet (MSG_TRUNC)
  kDropBadReply,      // flow -> tun: not a TCP packet of this very flow (the reverse tuple)
  kDropTunFull,       // flow -> tun: write() EAGAIN
  kDropTunError,      // flow -> tun: any other write() error
  kDropTunReadError,  // read(tun) failed for good (the device is gone): the tun is no longer polled
  kDropSinkFull,      // tun -> sink: send() EAGAIN (the sink's reader is behind)
  kDropSinkError,     // tun -> sink: any other send() error (EPIPE: the sink's peer is gone)
  kDropSinkReadError, // sink -> tun: recv() failed for good: the sink is no longer polled
  kDropCount,
};

const char* DropName(size_t drop) {
  switch (drop) {
    case kDropTruncated: return packet::VerdictName(Verdict::kTruncated);
    case kDropBadVersion: return packet::VerdictName(Verdict::kBadVersion);
    case kDropBadHeader: return packet::VerdictName(Verdict::kBadHeader);
    case kDropFragment: return packet::VerdictName(Verdict::kFragment);
    case kDropNotTcp: return packet::VerdictName(Verdict::kNotTcp);
    case kDropBadChecksum: return packet::VerdictName(Verdict::kBadChecksum);
    case kDropNoFlow: return "noFlow";
    case kDropSocketFull: return "socketFull";
    case kDropSocketError: return "socketError";
    case kDropFlowSetup: return "flowSetup";
    case kDropOversize: return "oversize";
    case kDropBadReply: return "badReply";
    case kDropTunFull: return "tunFull";
    case kDropTunError: return "tunError";
    case kDropTunReadError: return "tunReadError";
    case kDropSinkFull: return "sinkFull";
    case kDropSinkError: return "sinkError";
    case kDropSinkReadError: return "sinkReadError";
  }
  return "unknown";
}

Drop DropOf(Verdict verdict) {
  switch (verdict) {
    case Verdict::kTruncated: return kDropTruncated;
    case Verdict::kBadVersion: return kDropBadVersion;
    case Verdict::kBadHeader: return kDropBadHeader;
    case Verdict::kFragment: return kDropFragment;
    case Verdict::kNotTcp: return kDropNotTcp;
    case Verdict::kBadChecksum: return kDropBadChecksum;
    case Verdict::kOk: break;
  }
  return kDropBadHeader;
}

// Reads an optional boolean option; an error naming the field when it is not a boolean.
bool BoolField(const Napi::Object& object, const char* name, bool fallback) {
  Napi::Value value = object.Get(name);
  if (value.IsUndefined()) return fallback;
  if (!value.IsBoolean()) throw Napi::TypeError::New(object.Env(), std::string("\"") + name + "\" must be a boolean");
  return value.As<Napi::Boolean>().Value();
}

// SO_*BUFFORCE needs CAP_NET_ADMIN; without it the plain options still raise the buffers up to the wmem_max /
// rmem_max sysctls. Failing both is not fatal: the flow works with smaller buffers and drops as socketFull.
void SetFlowSocketBuffers(int fd) {
  int size = kFlowSocketBuffer;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  }
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0) {
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  }
}

// A new flow as JS receives it. `fd` is the Bumblebee end of the pair: JS owns it once it is in the outbox.
struct FlowRecord {
  uint64_t id = 0;
  int fd = -1;
  int family = 0;
  std::string client_address;
  uint16_t client_port = 0;
  std::string destination_address;
  uint16_t destination_port = 0;
};

// A flow taken off a paused loop, or given to a new one: our end and the tracking state, with times relative to
// the moment of the pause (monotonic clocks need not be shared, and a relative age survives any clock).
struct ExportedFlow {
  uint64_t id = 0;
  int fd = -1;
  Tuple tuple;
  int64_t idle_ms = 0;
  int64_t close_in_ms = -1;  // -1: not closing
  bool fin_from_client = false;
  bool fin_from_server = false;
  bool rst = false;
};

// What the JS object shares with the loop thread.
struct OnRampShared {
  std::atomic<int64_t> flows{0};
  std::atomic<int64_t> flows_total{0};
  std::atomic<int64_t> packets_from_tun{0};
  std::atomic<int64_t> packets_to_tun{0};
  std::atomic<int64_t> packets_to_sink{0};
  std::atomic<int64_t> packets_from_sink{0};
  std::atomic<bool> sink_eof{false};  // the sink's peer hung up, so reading it stopped
  std::array<std::atomic<int64_t>, kDropCount> drops{};
  // New flows for JS. It outlives every loop (pause and resume replace the loop, not the outbox), and what it
  // holds while paused is what pause() hands out as `pending`.
  Outbox<FlowRecord> new_flows;

  void Count(Drop drop) { drops[drop].fetch_add(1, std::memory_order_relaxed); }
};

struct Flow {
  Tuple tuple;  // client -> destination, as read from the tun
  Tuple reply;  // destination -> client, what the flow socket must carry
  uint64_t id = 0;
  int fd = -1;  // our end
  int64_t last_activity = 0;
  int64_t close_at = 0;
  bool fin_from_client = false;
  bool fin_from_server = false;
  bool rst = false;
  bool closing = false;  // close_at is set
  bool closed = false;   // our end is closed; the Flow waits in the graveyard until the epoll batch is done
};

// How the loop treats packets, from the JS options.
struct OnRampConfig {
  int64_t close_delay_ms = 500;
  int64_t idle_timeout_ms = 0;
  int sink_fd = -1;  // borrowed; -1: no sink (non-TCP packets are dropped as notTcp & co.)
  bool demultiplex_tcp = true;
};

// A failed syscall while the loop is being set up, reported to JS as an ErrnoException.
struct SetupError {
  int err;
  const char* syscall;
};

// ---------------------------------------------------------------------------------------------------------------
// OnRampLoop: the epoll thread and the flows it owns.

class OnRampLoop : public EngineThread {
 public:
  // Throws SetupError when the tun or the sink cannot be polled (not a pollable fd), std::system_error when epoll
  // or eventfd cannot be created or the thread cannot start. The command queue's eventfd (which only ever wakes
  // the loop to stop it, or to mark it exporting just before) is the registration whose data.ptr is nullptr.
  // `initial` are flows adopted from a paused loop (ours or a predecessor's); their fds become this loop's, unless
  // it throws before taking them (every throw but the thread's start).
  OnRampLoop(std::shared_ptr<OnRampShared> shared, int tun_fd, const OnRampConfig& config,
             std::vector<ExportedFlow> initial = {}, uint64_t next_id = 1)
      : EngineThread(nullptr),
        shared_(std::move(shared)),
        tun_(tun_fd),
        sink_(config.sink_fd),
        demultiplex_tcp_(config.demultiplex_tcp),
        close_delay_ms_(config.close_delay_ms),
        idle_timeout_ms_(config.idle_timeout_ms),
        buffer_(new uint8_t[kPacketBufferSize]),
        next_id_(next_id) {
    // Level-triggered: a batch cap then simply leaves the rest for the next round, after the other fds.
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.ptr = this;  // the tun
    if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, tun_, &event) < 0) {
      throw SetupError{errno, "epoll_ctl"};
    }
    tun_polled_ = true;
    if (sink_ >= 0) {
      event.events = EPOLLIN;
      event.data.ptr = &sink_;  // the sink: any address that is neither nullptr, this nor a Flow
      if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, sink_, &event) < 0) {
        int err = errno;
        epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, tun_, nullptr);
        tun_polled_ = false;
        throw SetupError{err, "epoll_ctl"};
      }
      sink_polled_ = true;
    }
    // Adopted flows join before the thread exists, so touching flows_ here races with nothing. A flow whose fd
    // cannot be polled is closed: its EOF tells Bumblebee the flow is over, which beats a flow nobody relays.
    now_ = MonotonicMs();
    for (ExportedFlow& exported : initial) {
      auto flow = std::make_unique<Flow>();
      flow->tuple = exported.tuple;
      flow->reply = exported.tuple.Reversed();
      flow->id = exported.id;
      flow->fd = exported.fd;
      flow->last_activity = now_ - exported.idle_ms;
      flow->fin_from_client = exported.fin_from_client;
      flow->fin_from_server = exported.fin_from_server;
      flow->rst = exported.rst;
      if (exported.close_in_ms >= 0) {
        flow->closing = true;
        flow->close_at = now_ + exported.close_in_ms;
        pending_closes_++;
      }
      if (next_id_ <= flow->id) next_id_ = flow->id + 1;
      if (MakeNonblocking(flow->fd) < 0 || flows_.count(flow->tuple) != 0) {
        if (flow->closing) pending_closes_--;
        ::close(flow->fd);
        continue;
      }
      epoll_event flow_event{};
      flow_event.events = EPOLLIN;
      flow_event.data.ptr = flow.get();
      if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, flow->fd, &flow_event) < 0) {
        if (flow->closing) pending_closes_--;
        ::close(flow->fd);
        continue;
      }
      flows_.emplace(flow->tuple, std::move(flow));
      shared_->flows.fetch_add(1, std::memory_order_relaxed);
    }
    try {
      Start([this] { Run(); });
    } catch (const std::system_error&) {
      // The adopted flows are ours now: closing them ends them cleanly (EOF on the Bumblebee end).
      for (auto& [tuple, flow] : flows_) ::close(flow->fd);
      shared_->flows.fetch_sub(static_cast<int64_t>(flows_.size()));
      flows_.clear();
      throw;
    }
  }

  // Stop() (EngineThread) ends the loop, which closes our end of every flow as it leaves.
  ~OnRampLoop() { Stop(); }

  // Stops the loop without closing any flow and hands every flow out (their fds are the caller's from here).
  // Only for the JS thread; after it the loop is finished (it cannot be restarted: make a new one). The flag is
  // posted ahead of Stop()'s own command, so the loop has it by the time it leaves; after Stop() (or a loop that
  // already left on an epoll error) the flows are closed and there is nothing to hand out.
  std::vector<ExportedFlow> Export() {
    Post([this] { exporting_ = true; });
    Stop();
    // Joined: the thread is gone, so flows_ is ours to read.
    std::vector<ExportedFlow> exported;
    int64_t now = MonotonicMs();
    for (auto& [tuple, flow] : flows_) {
      ExportedFlow out;
      out.id = flow->id;
      out.fd = flow->fd;
      out.tuple = flow->tuple;
      out.idle_ms = std::max<int64_t>(0, now - flow->last_activity);
      out.close_in_ms = flow->closing ? std::max<int64_t>(0, flow->close_at - now) : -1;
      out.fin_from_client = flow->fin_from_client;
      out.fin_from_server = flow->fin_from_server;
      out.rst = flow->rst;
      exported.push_back(out);
    }
    shared_->flows.fetch_sub(static_cast<int64_t>(flows_.size()));
    flows_.clear();
    return exported;
  }

  // The id the next new flow gets (read after Export, to carry on the numbering in a successor).
  uint64_t next_id() const { return next_id_; }

 private:
  void Run() {
    epoll_event events[256];
    int64_t next_tick = MonotonicMs() + kTimerTickMs;
    while (!stopping()) {
      int timeout = -1;
      if (Timed()) timeout = static_cast<int>(std::clamp<int64_t>(next_tick - MonotonicMs(), 0, kTimerTickMs));
      int count = epoll_wait(epoll_fd(), events, 256, timeout);
      if (count < 0 && errno != EINTR) break;  // EBADF/EINVAL: our own epoll fd is broken; nothing to wait on
      now_ = MonotonicMs();
      for (int i = 0; i < count; i++) {
        void* tag = events[i].data.ptr;
        if (tag == nullptr) {
          RunCommands();
        } else if (tag == this) {
          ReadTun();
        } else if (tag == &sink_) {
          if (sink_polled_) OnSinkEvent(events[i].events);
        } else {
          auto* flow = static_cast<Flow*>(tag);
          // A flow closed earlier in this batch is still allocated (graveyard), so this check is safe.
          if (!flow->closed) OnFlowEvent(flow, events[i].events);
        }
      }
      if (Timed() && now_ >= next_tick) {
        CheckTimers();
        next_tick = now_ + kTimerTickMs;
      }
      graveyard_.clear();
    }
    for (auto& [tuple, flow] : flows_) {
      epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, flow->fd, nullptr);
      // Exported flows stay open: Export() hands them out once the thread has been joined.
      if (!exporting_) ::close(flow->fd);
    }
    if (!exporting_) {
      shared_->flows.fetch_sub(static_cast<int64_t>(flows_.size()));
      flows_.clear();
    }
    graveyard_.clear();
    // The tun stays open (it is the caller's), so take it off our epoll set explicitly.
    if (tun_polled_) epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, tun_, nullptr);
    tun_polled_ = false;
    // Likewise the sink, which is borrowed.
    StopSink();
  }

  // A tick is needed only while some flow can expire.
  bool Timed() const { return pending_closes_ > 0 || (idle_timeout_ms_ > 0 && !flows_.empty()); }

  void ReadTun() {
    for (int n = 0; n < kTunBatch; n++) {
      ssize_t got = read(tun_, buffer_.get(), kPacketBufferSize);
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        // EBADFD (the device was deleted) and the like do not heal, and level-triggered epoll would report
        // them forever: stop reading the tun. The flows keep running until they end or idle out.
        shared_->Count(kDropTunReadError);
        epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, tun_, nullptr);
        tun_polled_ = false;
        return;
      }
      if (got == 0) return;
      shared_->packets_from_tun.fetch_add(1, std::memory_order_relaxed);
      FromTun(buffer_.get(), static_cast<size_t>(got));
    }
  }

  void FromTun(uint8_t* data, size_t size) {
    if (sink_ >= 0 && !demultiplex_tcp_) {
      // Everything, unparsed: the sink's reader (Fish) parses and counts bad packets itself.
      ToSink(data, size);
      return;
    }
    TcpSegment segment;
    Verdict verdict = packet::ParseTcp(data, size, false, &segment);
    if (verdict != Verdict::kOk) {
      if (sink_ >= 0) {
        ToSink(data, size);
      } else {
        shared_->Count(DropOf(verdict));
      }
      return;
    }
    Tuple tuple = Tuple::Of(segment);
    bool opening = (segment.flags & (packet::kTcpSyn | packet::kTcpAck | packet::kTcpRst)) == packet::kTcpSyn;
    auto found = flows_.find(tuple);
    Flow* flow = found == flows_.end() ? nullptr : found->second.get();
    if (flow != nullptr && opening && flow->closing) {
      // The client reuses the tuple of a connection that already ended (FIN both ways or RST): a new
      // connection, not a retransmission, so it gets a new flow rather than the old flow's last moments.
      CloseFlow(flow);
      flow = nullptr;
    }
    if (flow == nullptr) {
      if (opening) {
        StartFlow(segment, tuple);
      } else {
        shared_->Count(kDropNoFlow);
      }
      return;
    }
    // A retransmitted SYN for a live flow lands here too and is simply forwarded.
    flow->last_activity = now_;
    // Tracked whether or not the send succeeds: an RST from the client is never retransmitted.
    Track(flow, segment.flags, true);
    if (send(flow->fd, segment.ip, segment.length, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
      // Router semantics: TCP retransmits what we drop.
      shared_->Count(errno == EAGAIN ? kDropSocketFull : kDropSocketError);
    }
  }

  void StartFlow(const TcpSegment& syn, const Tuple& tuple) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) {
      shared_->Count(kDropFlowSetup);
      return;
    }
    FileDescriptor ours(pair[0]);
    FileDescriptor theirs(pair[1]);
    SetFlowSocketBuffers(ours.get());
    SetFlowSocketBuffers(theirs.get());
    // Only our end is nonblocking: O_NONBLOCK lives on the open file description, and the other end goes to
    // another process, which decides for itself.
    if (MakeNonblocking(ours.get()) < 0) {
      shared_->Count(kDropFlowSetup);
      return;
    }
    auto flow = std::make_unique<Flow>();
    flow->tuple = tuple;
    flow->reply = tuple.Reversed();
    flow->last_activity = now_;
    epoll_event event{};
    event.events = EPOLLIN;  // EPOLLHUP and EPOLLERR are always reported
    event.data.ptr = flow.get();
    if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, ours.get(), &event) < 0) {
      shared_->Count(kDropFlowSetup);
      return;
    }
    // The SYN waits in the pair until Bumblebee holds the other end (§6). It cannot find the pair full, but if
    // it were lost the client's SYN retransmission would simply be forwarded to the new flow.
    if (send(ours.get(), syn.ip, syn.length, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
      shared_->Count(errno == EAGAIN ? kDropSocketFull : kDropSocketError);
    }
    flow->id = next_id_++;
    flow->fd = ours.release();

    FlowRecord record;
    record.id = flow->id;
    record.fd = theirs.release();
    record.family = tuple.family;
    record.client_address = AddressString(tuple.family, tuple.src);
    record.client_port = tuple.sport;
    record.destination_address = AddressString(tuple.family, tuple.dst);
    record.destination_port = tuple.dport;

    flows_.emplace(tuple, std::move(flow));
    shared_->flows.fetch_add(1, std::memory_order_relaxed);
    shared_->flows_total.fetch_add(1, std::memory_order_relaxed);
    shared_->new_flows.Push(std::move(record));
  }

  void OnFlowEvent(Flow* flow, uint32_t events) {
    uint8_t* data = buffer_.get();
    bool drained = false;
    for (int n = 0; n < kFlowBatch && !drained; n++) {
      iovec iov{data, kPacketBufferSize};
      msghdr message{};
      message.msg_iov = &iov;
      message.msg_iovlen = 1;
      ssize_t got = recvmsg(flow->fd, &message, MSG_DONTWAIT);
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
          drained = true;
          continue;
        }
        CloseFlow(flow);  // ECONNRESET and the like: the pair is broken
        return;
      }
      if (got == 0) {
        // EOF (SEQPACKET never carries empty messages): Bumblebee is done with the flow.
        CloseFlow(flow);
        return;
      }
      if (message.msg_flags & MSG_TRUNC) {
        shared_->Count(kDropOversize);
        continue;
      }
      ToTun(flow, data, static_cast<size_t>(got));
    }
    // Normally recv() reports the peer's close itself (0 once the queue is empty); a hang-up or error with
    // nothing left to read would otherwise be reported again on every round by level-triggered epoll.
    if (drained && (events & (EPOLLHUP | EPOLLERR)) != 0) CloseFlow(flow);
  }

  void ToTun(Flow* flow, uint8_t* data, size_t size) {
    TcpSegment segment;
    if (packet::ParseTcp(data, size, false, &segment) != Verdict::kOk || !(Tuple::Of(segment) == flow->reply)) {
      // Only this flow's own packets reach the client: a flow socket cannot inject anything else.
      shared_->Count(kDropBadReply);
      return;
    }
    flow->last_activity = now_;
    Track(flow, segment.flags, false);
    ssize_t written = write(tun_, segment.ip, segment.length);
    if (written < 0) {
      shared_->Count(errno == EAGAIN ? kDropTunFull : kDropTunError);
      return;
    }
    shared_->packets_to_tun.fetch_add(1, std::memory_order_relaxed);
  }

  // Router semantics again: what the sink cannot take now is dropped and counted, never queued here.
  void ToSink(const uint8_t* data, size_t size) {
    if (send(sink_, data, size, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
      shared_->Count(errno == EAGAIN ? kDropSinkFull : kDropSinkError);
      return;
    }
    shared_->packets_to_sink.fetch_add(1, std::memory_order_relaxed);
  }

  void OnSinkEvent(uint32_t events) {
    uint8_t* data = buffer_.get();
    bool drained = false;
    for (int n = 0; n < kSinkBatch && !drained; n++) {
      iovec iov{data, kPacketBufferSize};
      msghdr message{};
      message.msg_iov = &iov;
      message.msg_iovlen = 1;
      ssize_t got = recvmsg(sink_, &message, MSG_DONTWAIT);
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
          drained = true;
          continue;
        }
        // ECONNRESET and the like do not heal, and level-triggered epoll would report them forever.
        shared_->Count(kDropSinkReadError);
        StopSink();
        return;
      }
      if (got == 0) {
        // EOF (SEQPACKET never carries empty messages): the peer is gone. Sends to it now fail as sinkError.
        shared_->sink_eof.store(true, std::memory_order_relaxed);
        StopSink();
        return;
      }
      shared_->packets_from_sink.fetch_add(1, std::memory_order_relaxed);
      if (message.msg_flags & MSG_TRUNC) {
        shared_->Count(kDropOversize);
        continue;
      }
      ssize_t written = write(tun_, data, static_cast<size_t>(got));
      if (written < 0) {
        shared_->Count(errno == EAGAIN ? kDropTunFull : kDropTunError);
        continue;
      }
      shared_->packets_to_tun.fetch_add(1, std::memory_order_relaxed);
    }
    // As for flows: a hang-up with nothing left to read would otherwise be reported on every round.
    if (drained && (events & (EPOLLHUP | EPOLLERR)) != 0) {
      shared_->sink_eof.store(true, std::memory_order_relaxed);
      StopSink();
    }
  }

  // Stops reading the sink; it stays open (it is the caller's), and tun -> sink keeps trying (and counting).
  void StopSink() {
    if (!sink_polled_) return;
    epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, sink_, nullptr);
    sink_polled_ = false;
  }

  // FIN both ways or an RST either way: the flow is over, but it keeps relaying for closeDelayMs so the last
  // ACK and any retransmitted FIN still pass.
  void Track(Flow* flow, uint8_t flags, bool from_client) {
    if (flags & packet::kTcpRst) flow->rst = true;
    if (flags & packet::kTcpFin) (from_client ? flow->fin_from_client : flow->fin_from_server) = true;
    if (!flow->closing && (flow->rst || (flow->fin_from_client && flow->fin_from_server))) {
      flow->closing = true;
      flow->close_at = now_ + close_delay_ms_;
      pending_closes_++;
    }
  }

  void CheckTimers() {
    std::vector<Flow*> expired;
    for (auto& [tuple, flow] : flows_) {
      if ((flow->closing && now_ >= flow->close_at) ||
          (idle_timeout_ms_ > 0 && now_ - flow->last_activity >= idle_timeout_ms_)) {
        expired.push_back(flow.get());
      }
    }
    for (Flow* flow : expired) CloseFlow(flow);
  }

  // Closing our end is the flow's end as Bumblebee sees it (EOF on its end).
  void CloseFlow(Flow* flow) {
    if (flow->closed) return;
    flow->closed = true;
    // Off epoll before close(2), so no later event can name it.
    epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, flow->fd, nullptr);
    ::close(flow->fd);
    flow->fd = -1;
    if (flow->closing) pending_closes_--;
    auto found = flows_.find(flow->tuple);
    // Freed after the current epoll batch: later events of the batch may still point at it.
    graveyard_.push_back(std::move(found->second));
    flows_.erase(found);
    shared_->flows.fetch_sub(1, std::memory_order_relaxed);
  }

  std::shared_ptr<OnRampShared> shared_;
  int tun_;
  int sink_;  // -1 without a sink
  bool demultiplex_tcp_;
  int64_t close_delay_ms_;
  int64_t idle_timeout_ms_;
  std::unique_ptr<uint8_t[]> buffer_;
  bool tun_polled_ = false;
  bool sink_polled_ = false;
  // Touched only by the loop thread (and by Export() once it has joined it).
  bool exporting_ = false;  // stop without closing the flows (pause); set by a command Export() posts
  std::unordered_map<Tuple, std::unique_ptr<Flow>, TupleHash> flows_;
  std::vector<std::unique_ptr<Flow>> graveyard_;
  int pending_closes_ = 0;
  int64_t now_ = MonotonicMs();
  uint64_t next_id_;
};

// ---------------------------------------------------------------------------------------------------------------
// OnRamp: the JS object.

class OnRamp final : public Napi::ObjectWrap<OnRamp>, public LoopResource {
 public:
  static Napi::Function DefineClass(Napi::Env env) {
    return ObjectWrap::DefineClass(env, "OnRamp",
                                   {
                                       InstanceMethod<&OnRamp::Stats>("stats"),
                                       InstanceMethod<&OnRamp::Pause>("pause"),
                                       InstanceMethod<&OnRamp::Resume>("resume"),
                                       InstanceMethod<&OnRamp::Close>("close"),
                                   });
  }

  // Constructed only by createOnRamp: (tunFd, options, onFlows).
  explicit OnRamp(const Napi::CallbackInfo& info)
      : ObjectWrap(info),
        addon_(Fdferry::Of(info.Env())),
        shared_(std::make_shared<OnRampShared>()),
        events_(info.Env(), "fdferry:OnRamp", info.This().As<Napi::Object>()) {
    Napi::Env env = info.Env();
    if (info.Length() < 3 || !info[0].IsNumber() || !info[1].IsObject() || !info[2].IsFunction()) {
      throw Napi::TypeError::New(env, "createOnRamp(tunFd, options, onFlows)");
    }
    int tun_fd = FdArgument(info, 0);
    Napi::Object options = info[1].As<Napi::Object>();
    OnRampConfig config;
    config.close_delay_ms = static_cast<int64_t>(NumberField(options, "closeDelayMs", 500, 0, kMaxSafeInteger));
    config.idle_timeout_ms = static_cast<int64_t>(NumberField(options, "idleTimeoutMs", 0, 0, kMaxSafeInteger));
    config.sink_fd = static_cast<int>(NumberField(options, "sinkFd", -1, -1, 2147483647.0));
    config.demultiplex_tcp = BoolField(options, "demultiplexTcp", true);
    if (config.sink_fd < 0 && !config.demultiplex_tcp) {
      throw Napi::TypeError::New(env, "\"demultiplexTcp\": false needs a \"sinkFd\" to send TCP to");
    }
    if (config.sink_fd >= 0) {
      // Message boundaries are what make a socket a packet channel: a stream socket would glue packets together.
      int type = 0;
      socklen_t length = sizeof type;
      if (getsockopt(config.sink_fd, SOL_SOCKET, SO_TYPE, &type, &length) < 0) {
        throw ErrnoException(env, errno, "getsockopt(SO_TYPE)");
      }
      if (type != SOCK_SEQPACKET) throw Napi::TypeError::New(env, "\"sinkFd\" must be a SOCK_SEQPACKET socket");
      SetFlowSocketBuffers(config.sink_fd);
    }
    // Flows adopted from a paused on-ramp (a predecessor's): parsed (and checked) before anything is taken.
    std::vector<ExportedFlow> adopted;
    uint64_t next_id = 1;
    Napi::Value flows = options.Get("flows");
    if (!flows.IsUndefined()) adopted = ParseFlows(env, flows);
    next_id = static_cast<uint64_t>(NumberField(options, "nextFlowId", 1, 1, kMaxSafeInteger));
    // The tun is the caller's, but read(2) has no MSG_DONTWAIT: the loop needs it nonblocking.
    if (MakeNonblocking(tun_fd) < 0) throw ErrnoException(env, errno, "fcntl");
    tun_fd_ = tun_fd;
    config_ = config;

    // Open for the on-ramp's whole life, paused or not: pause and resume replace the loop, not the handle.
    events_.Open<OnRamp, &OnRamp::DeliverFlows>(addon_, shared_->new_flows, this, info[2].As<Napi::Function>());
    try {
      loop_ = std::make_unique<OnRampLoop>(shared_, tun_fd, config, adopted, next_id);
    } catch (const SetupError& error) {
      events_.Close();
      // Not adopted (setup failed before): the flows are the caller's again, as on any throw.
      throw ErrnoException(env, error.err, error.syscall);
    } catch (const std::system_error& error) {
      events_.Close();
      throw ErrnoException(env, error);
    }
    addon_.Register(static_cast<LoopResource*>(this));
    // Strong while running: new flows call back into this object from the loop.
    Ref();
  }

  ~OnRamp() override { StopLoop(); }

  void CloseForTeardown() override {
    if (closed_) return;
    closed_ = true;
    StopLoop();
    events_.Close();  // empty: StopLoop has taken the outbox
    addon_.Unregister(static_cast<LoopResource*>(this));
    Unref();
  }

 private:
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const OnRampShared& s = *shared_;
    Napi::Object stats = Napi::Object::New(env);
    stats.Set("flows", static_cast<double>(s.flows.load()));
    stats.Set("flowsTotal", static_cast<double>(s.flows_total.load()));
    stats.Set("packetsFromTun", static_cast<double>(s.packets_from_tun.load()));
    stats.Set("packetsToTun", static_cast<double>(s.packets_to_tun.load()));
    stats.Set("packetsToSink", static_cast<double>(s.packets_to_sink.load()));
    stats.Set("packetsFromSink", static_cast<double>(s.packets_from_sink.load()));
    stats.Set("sinkEof", s.sink_eof.load());
    Napi::Object drops = Napi::Object::New(env);
    for (size_t i = 0; i < kDropCount; i++) drops.Set(DropName(i), static_cast<double>(s.drops[i].load()));
    stats.Set("drops", drops);
    return stats;
  }

  // The same as at teardown: flows that never reached JS are closed rather than delivered during close(), since
  // our ends are closed too and they would be dead on arrival.
  void Close(const Napi::CallbackInfo&) { CloseForTeardown(); }

  // pause(): stops reading the tun, the sink and every flow, closes nothing, and returns
  // {flows, pending, nextFlowId}: our end of every flow with its state, and the flows whose Bumblebee end
  // had not been delivered yet (JS owns them now, as if delivered). Idempotent: paused again, nothing is left.
  Napi::Value Pause(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) throw Napi::Error::New(env, "the on-ramp is closed");
    std::vector<ExportedFlow> exported;
    uint64_t next_id = next_id_after_pause_;
    if (loop_) {
      exported = loop_->Export();
      next_id = loop_->next_id();
      loop_.reset();
      next_id_after_pause_ = next_id;
    }
    std::vector<FlowRecord> pending = shared_->new_flows.Take();
    Napi::Object result = Napi::Object::New(env);
    Napi::Array flows = Napi::Array::New(env, exported.size());
    uint32_t index = 0;
    for (const ExportedFlow& f : exported) {
      Napi::Object tuple = Napi::Object::New(env);
      tuple.Set("family", f.tuple.family);
      tuple.Set("clientAddress", AddressString(f.tuple.family, f.tuple.src));
      tuple.Set("clientPort", f.tuple.sport);
      tuple.Set("destinationAddress", AddressString(f.tuple.family, f.tuple.dst));
      tuple.Set("destinationPort", f.tuple.dport);
      Napi::Object object = Napi::Object::New(env);
      object.Set("flowId", static_cast<double>(f.id));
      object.Set("fd", f.fd);
      object.Set("tuple", tuple);
      object.Set("idleMs", static_cast<double>(f.idle_ms));
      object.Set("closeInMs", static_cast<double>(f.close_in_ms));
      object.Set("finFromClient", f.fin_from_client);
      object.Set("finFromServer", f.fin_from_server);
      object.Set("rst", f.rst);
      flows.Set(index++, object);
    }
    Napi::Array delivered = Napi::Array::New(env, pending.size());
    index = 0;
    for (const FlowRecord& f : pending) delivered.Set(index++, RecordObject(env, f));
    result.Set("flows", flows);
    result.Set("pending", delivered);
    result.Set("nextFlowId", static_cast<double>(next_id));
    return result;
  }

  // resume({flows, nextFlowId}): restarts a paused on-ramp with these flows (normally what pause() returned: a
  // rolled-back hand-over). The flows' fds are the on-ramp's again.
  void Resume(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) throw Napi::Error::New(env, "the on-ramp is closed");
    if (loop_) throw Napi::Error::New(env, "the on-ramp is not paused");
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "resume({flows, nextFlowId})");
    Napi::Object paused = info[0].As<Napi::Object>();
    std::vector<ExportedFlow> adopted = ParseFlows(env, paused.Get("flows"));
    uint64_t next_id = static_cast<uint64_t>(NumberField(paused, "nextFlowId", static_cast<double>(next_id_after_pause_), 1, kMaxSafeInteger));
    try {
      loop_ = std::make_unique<OnRampLoop>(shared_, tun_fd_, config_, adopted, next_id);
    } catch (const SetupError& error) {
      throw ErrnoException(env, error.err, error.syscall);
    } catch (const std::system_error& error) {
      throw ErrnoException(env, error);
    }
  }

  // Reads a `flows` list as pause() writes it; every fd must be a SOCK_SEQPACKET socket, so a wrong fd is refused
  // before the loop would relay packets into it.
  static std::vector<ExportedFlow> ParseFlows(Napi::Env env, Napi::Value value) {
    if (!value.IsArray()) throw Napi::TypeError::New(env, "\"flows\" must be an array");
    Napi::Array list = value.As<Napi::Array>();
    std::vector<ExportedFlow> flows;
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value item = list.Get(i);
      if (!item.IsObject()) throw Napi::TypeError::New(env, "\"flows\" must hold objects");
      Napi::Object object = item.As<Napi::Object>();
      ExportedFlow flow;
      flow.id = static_cast<uint64_t>(NumberField(object, "flowId", 0, 1, kMaxSafeInteger));
      flow.fd = static_cast<int>(NumberField(object, "fd", -1, 0, 2147483647.0));
      flow.idle_ms = static_cast<int64_t>(NumberField(object, "idleMs", 0, 0, kMaxSafeInteger));
      flow.close_in_ms = static_cast<int64_t>(NumberField(object, "closeInMs", -1, -1, kMaxSafeInteger));
      flow.fin_from_client = BoolField(object, "finFromClient", false);
      flow.fin_from_server = BoolField(object, "finFromServer", false);
      flow.rst = BoolField(object, "rst", false);
      Napi::Value tupleValue = object.Get("tuple");
      if (!tupleValue.IsObject()) throw Napi::TypeError::New(env, "a flow needs its \"tuple\"");
      Napi::Object tuple = tupleValue.As<Napi::Object>();
      int family = static_cast<int>(NumberField(tuple, "family", 0, 0, 6));
      if (family != 4 && family != 6) throw Napi::RangeError::New(env, "\"family\" must be 4 or 6");
      flow.tuple.family = static_cast<uint8_t>(family);
      flow.tuple.sport = static_cast<uint16_t>(NumberField(tuple, "clientPort", 0, 0, 65535));
      flow.tuple.dport = static_cast<uint16_t>(NumberField(tuple, "destinationPort", 0, 0, 65535));
      const std::pair<const char*, uint8_t*> addresses[] = {{"clientAddress", flow.tuple.src}, {"destinationAddress", flow.tuple.dst}};
      for (auto [name, target] : addresses) AddressField(tuple, name, family, target);
      int type = 0;
      socklen_t length = sizeof type;
      if (getsockopt(flow.fd, SOL_SOCKET, SO_TYPE, &type, &length) < 0 || type != SOCK_SEQPACKET) {
        throw Napi::TypeError::New(env, "flow " + std::to_string(flow.id) + ": \"fd\" must be a SOCK_SEQPACKET socket");
      }
      flows.push_back(flow);
    }
    return flows;
  }

  // Stops the thread (closing our ends), then closes the other end of every flow JS has not received.
  void StopLoop() {
    if (loop_) loop_->Stop();
    loop_.reset();
    for (FlowRecord& record : shared_->new_flows.Take()) ::close(record.fd);
  }

  // A new flow as onFlows (and pause's `pending`) give it to JS.
  static Napi::Object RecordObject(Napi::Env env, const FlowRecord& f) {
    Napi::Object tuple = Napi::Object::New(env);
    tuple.Set("family", f.family);
    tuple.Set("clientAddress", f.client_address);
    tuple.Set("clientPort", f.client_port);
    tuple.Set("destinationAddress", f.destination_address);
    tuple.Set("destinationPort", f.destination_port);
    Napi::Object object = Napi::Object::New(env);
    object.Set("flowId", static_cast<double>(f.id));
    object.Set("fd", f.fd);
    object.Set("tuple", tuple);
    return object;
  }

  // Once taken from the outbox the fds are JS's, even if the callback throws. Nothing after close(): events_ is
  // closed by then.
  void DeliverFlows() { events_.Deliver(Value(), RecordObject); }

  Fdferry& addon_;
  std::shared_ptr<OnRampShared> shared_;
  EngineEvents<FlowRecord> events_;
  // Stopped (joined) before events_ closes, in the order engine_events.h gives.
  std::unique_ptr<OnRampLoop> loop_;  // null while paused
  int tun_fd_ = -1;  // borrowed, for resume()
  OnRampConfig config_;
  uint64_t next_id_after_pause_ = 1;
  bool closed_ = false;
};

Napi::Value CreateOnRamp(const Napi::CallbackInfo& info) {
  return Construct(Fdferry::Of(info.Env()).onRampClass, info, 3);
}

}  // namespace

void InitOnRamp(Napi::Env env, Napi::Object exports, Fdferry& addon) {
  addon.onRampClass = Napi::Persistent(OnRamp::DefineClass(env));
  exports.Set("createOnRamp", Napi::Function::New(env, CreateOnRamp, "createOnRamp"));
}

}  // namespace fdferry
