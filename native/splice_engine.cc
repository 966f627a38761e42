// Splicer's data plane: relays between pairs of stream sockets on dedicated epoll threads.
//
// Man pages: splice(2), pipe(2), pipe(7), fcntl(2) (F_SETPIPE_SZ, F_GETPIPE_SZ), epoll(7), epoll_ctl(2),
// eventfd(2), shutdown(2), send(2), socket(7) (SO_ERROR), clock_gettime(2). libuv docs: uv_async_t.
//
// How a direction moves bytes (src -> dst), all nonblocking and edge-triggered:
//   1. deliver what is left of the preface with send(MSG_NOSIGNAL);
//   2. flush the pipe into dst with splice(2) while it holds bytes;
//   3. with the pipe empty: after EOF, shutdown(dst, SHUT_WR) once (the half-close); otherwise splice from src
//      into the pipe, borrowing a pipe from the pool first and returning it as soon as src has nothing more.
// Edge-triggered epoll only reports a change of state, so every step runs until it would block (EAGAIN); a
// direction that is still busy after a bounded number of rounds goes on the thread's ready list instead, so one
// fast relay cannot starve the others on its thread.
#include "splice_engine.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <unordered_map>
#include <utility>

#include "engine_thread.h"
#include "errors.h"
#include "fd.h"
#include "clock.h"
#include "js_fields.h"

namespace fdferry {

namespace {

// Rounds (fill + flush of one pipe) a direction may run per wakeup before yielding to other relays.
constexpr int kMaxRoundsPerTurn = 16;
// Granularity of idle and duration timeouts.
constexpr int kTimerTickMs = 100;
// Buffer of a relay that cannot splice and copies through user space instead.
constexpr size_t kCopyBufferSize = 64 * 1024;

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

struct Pipe {
  int read_end = -1;
  int write_end = -1;
  int size = 0;
  int index = -1;  // in the persistent pool, or -1
  bool valid() const { return read_end >= 0; }
};

struct Relay;

// What an epoll event points at: one socket of one relay.
struct Endpoint {
  Relay* relay;
  char side;
};

struct Direction {
  int src = -1;
  int dst = -1;
  char src_side = 0;
  char dst_side = 0;
  Pipe pipe;
  uint64_t in_pipe = 0;
  std::string preface;
  size_t preface_sent = 0;
  uint64_t bytes = 0;
  uint64_t cap = 0;  // 0: none
  bool eof = false;       // src said EOF
  bool finished = false;  // ... and it reached dst as shutdown(SHUT_WR)
  // Copy mode: src or dst cannot splice (EINVAL), so this direction copies through a user-space buffer.
  bool copy_mode = false;
  std::vector<char> buffer;
  size_t buffered = 0;
  size_t buffer_sent = 0;
};

struct Relay {
  uint64_t id = 0;
  int fd_a = -1;
  int fd_b = -1;
  Direction ab;
  Direction ba;
  Endpoint endpoint_a{this, 'a'};
  Endpoint endpoint_b{this, 'b'};
  int64_t idle_timeout_ms = 0;
  int64_t max_duration_ms = 0;
  int64_t started_mono = 0;
  int64_t last_activity = 0;
  double started_wall = 0;
  bool ended = false;
  bool queued_ready = false;
  bool queued_waiting = false;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// SpliceThread: one epoll loop and the relays that live on it.

class SpliceThread : public EngineThread {
 public:
  // The command queue's eventfd is the only registration without an Endpoint (data.ptr nullptr).
  SpliceThread(std::shared_ptr<SpliceShared> shared, int idle_pipe_limit)
      : EngineThread(nullptr), shared_(std::move(shared)), idle_pipe_limit_(idle_pipe_limit) {
    Start([this] { Run(); });
  }

  // Relays still running end with "shutdown" as the loop leaves.
  ~SpliceThread() { Stop(); }

  // A resumed relay's pipe, in a persistent engine, must be one the owner table can name: a pool pipe given
  // back by a rollback is marked again; a pipe from elsewhere (a predecessor, a crashed process) has its bytes
  // moved into a pool pipe (pipe to pipe, no copy) and is closed, so a crash from now on still finds them.
  void TakeIntoPool(Relay* relay, Direction& d) {
    if (!d.pipe.valid()) return;
    if (d.pipe.index >= 0) {
      MarkOwner(d.pipe, relay, &d);
      return;
    }
    if (!shared_->settings.persistent_pipes || idle_pipes_.empty()) return;
    Pipe pool = idle_pipes_.back();
    // At least as many slots as the source: a pipe-to-pipe splice then moves every buffer in one go, so the
    // bytes are never split between two pipes (which would reorder them).
    if (pool.size < d.pipe.size) return;
    uint64_t moved = 0;
    while (moved < d.in_pipe) {
      ssize_t n = splice(d.pipe.read_end, nullptr, pool.write_end, nullptr, d.in_pipe - moved, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n <= 0) break;
      moved += static_cast<uint64_t>(n);
    }
    if (moved != d.in_pipe) {
      // Cannot happen with the slot check above; if it does, move back what went over and keep the old pipe.
      while (moved > 0) {
        ssize_t n = splice(pool.read_end, nullptr, d.pipe.write_end, nullptr, moved, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n <= 0) break;
        moved -= static_cast<uint64_t>(n);
      }
      return;
    }
    idle_pipes_.pop_back();
    shared_->counters.pipes_idle--;
    Pipe adopted = std::exchange(d.pipe, pool);
    DestroyPipe(adopted);  // it was counted in use; the pool pipe now is
    MarkOwner(d.pipe, relay, &d);
  }

  // Makes `count` pipes for the persistent pool, numbered from `first`, and hands them out for storing.
  std::vector<PersistentPipe> MakePersistentPipes(int first, int count) {
    std::vector<PersistentPipe> made;
    for (int i = 0; i < count; i++) {
      int fds[2];
      if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) throw std::system_error(errno, std::generic_category(), "pipe2");
      Pipe pipe{fds[0], fds[1], 0, first + i};
      int size = fcntl(pipe.write_end, F_SETPIPE_SZ, shared_->settings.pipe_size);
      if (size < 0) {
        shared_->counters.pipe_resize_failures++;
        size = fcntl(pipe.write_end, F_GETPIPE_SZ);
      }
      pipe.size = size > 0 ? size : 4096;
      int64_t current = shared_->counters.pipe_size_min.load();
      while ((current == 0 || pipe.size < current) && !shared_->counters.pipe_size_min.compare_exchange_weak(current, pipe.size)) {
      }
      idle_pipes_.push_back(pipe);
      shared_->pipes_total++;
      shared_->counters.pipes_idle++;
      made.push_back({pipe.index, pipe.read_end, pipe.write_end});
    }
    return made;
  }

  void Add(std::unique_ptr<Relay> relay) {
    Relay* raw = relay.get();
    TakeIntoPool(raw, raw->ab);
    TakeIntoPool(raw, raw->ba);
    relays_[raw->id] = std::move(relay);
    shared_->counters.relays++;
    if (raw->idle_timeout_ms > 0 || raw->max_duration_ms > 0) timed_relays_++;
    if (!Register(raw)) return;
    Pump(raw);
  }

  bool Cancel(uint64_t id, const char* reason) {
    auto found = relays_.find(id);
    if (found == relays_.end()) return false;
    End(found->second.get(), reason, 0, 0);
    return true;
  }

  void EndAll(const char* reason) {
    std::vector<Relay*> all;
    for (auto& [id, relay] : relays_) all.push_back(relay.get());
    for (Relay* relay : all) End(relay, reason, 0, 0);
  }

  struct SnapshotRow {
    uint64_t id;
    uint64_t bytes_ab, bytes_ba;
    bool finished_ab, finished_ba;
    int64_t idle_ms;
    int pipes;
  };

  std::vector<SnapshotRow> Snapshot() {
    std::vector<SnapshotRow> rows;
    int64_t now = MonotonicMs();
    for (auto& [id, relay] : relays_) {
      rows.push_back({id, relay->ab.bytes, relay->ba.bytes, relay->ab.finished, relay->ba.finished,
                      now - relay->last_activity, (relay->ab.pipe.valid() ? 1 : 0) + (relay->ba.pipe.valid() ? 1 : 0)});
    }
    return rows;
  }

  // Takes every relay off epoll and hands its state out; pipes that hold bytes go with it (the caller owns them).
  std::vector<PausedRelayRecord> PauseAll() {
    std::vector<PausedRelayRecord> paused;
    for (auto& [id, relay] : relays_) {
      Unregister(relay.get());
      PausedRelayRecord record;
      record.id = static_cast<double>(id);
      record.fd_a = relay->fd_a;
      record.fd_b = relay->fd_b;
      record.idle_timeout_ms = static_cast<double>(relay->idle_timeout_ms);
      record.max_duration_ms = static_cast<double>(relay->max_duration_ms);
      record.max_bytes_ab = static_cast<double>(relay->ab.cap);
      record.max_bytes_ba = static_cast<double>(relay->ba.cap);
      record.started_at = relay->started_wall;
      record.pipe_index_ab = relay->ab.pipe.index;
      record.pipe_index_ba = relay->ba.pipe.index;
      ExportDirection(relay->ab, record.preface_ab, record.bytes_ab, record.finished_ab, record.eof_ab, record.pipe_ab,
                      record.pipe_bytes_ab);
      ExportDirection(relay->ba, record.preface_ba, record.bytes_ba, record.finished_ba, record.eof_ba, record.pipe_ba,
                      record.pipe_bytes_ba);
      if (relay->idle_timeout_ms > 0 || relay->max_duration_ms > 0) timed_relays_--;
      paused.push_back(std::move(record));
    }
    shared_->counters.relays -= static_cast<int64_t>(relays_.size());
    // Pausing runs as a command in the middle of an epoll batch: later events of that batch may still point at
    // these relays. Like ended relays they are marked and kept in the graveyard until the batch is done.
    for (auto& [id, relay] : relays_) {
      relay->ended = true;
      graveyard_.push_back(std::move(relay));
    }
    relays_.clear();
    return paused;
  }

 private:
  void ExportDirection(Direction& direction, std::string& preface, uint64_t& bytes, bool& finished, bool& eof,
                       int (&pipe)[2], uint64_t& pipe_bytes) {
    preface = direction.preface.substr(direction.preface_sent);
    // A copy-mode relay's buffered bytes are not lost: they become part of the preface.
    if (direction.buffer_sent < direction.buffered) {
      preface.append(direction.buffer.data() + direction.buffer_sent, direction.buffered - direction.buffer_sent);
    }
    bytes = direction.bytes;
    finished = direction.finished;
    eof = direction.eof;
    if (direction.pipe.valid() && direction.in_pipe > 0) {
      pipe[0] = direction.pipe.read_end;
      pipe[1] = direction.pipe.write_end;
      pipe_bytes = direction.in_pipe;
      MarkOwner(direction.pipe, nullptr, nullptr);
      direction.pipe = Pipe{};
      shared_->counters.pipes_in_use--;
      shared_->pipes_total--;
    } else {
      ReturnPipe(direction);
    }
  }

  bool Register(Relay* relay) {
    for (Endpoint* endpoint : {&relay->endpoint_a, &relay->endpoint_b}) {
      epoll_event event{};
      event.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
      event.data.ptr = endpoint;
      int fd = endpoint->side == 'a' ? relay->fd_a : relay->fd_b;
      if (epoll_ctl(epoll_fd(), EPOLL_CTL_ADD, fd, &event) < 0) {
        int err = errno;
        End(relay, "error", err, endpoint->side);
        return false;
      }
    }
    return true;
  }

  void Unregister(Relay* relay) {
    // EPOLL_CTL_DEL before anything else: once the relay is gone, no event may point at it. Failure means the fd
    // was never added (Register failed half-way) or is already closed by someone else; nothing to undo then.
    epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, relay->fd_a, nullptr);
    epoll_ctl(epoll_fd(), EPOLL_CTL_DEL, relay->fd_b, nullptr);
  }

  void Run() {
    epoll_event events[256];
    int64_t next_tick = MonotonicMs() + kTimerTickMs;
    while (!stopping()) {
      int timeout = -1;
      if (!ready_.empty()) {
        timeout = 0;
      } else if (!waiting_.empty()) {
        // A pipe may come back on another thread, which cannot wake us: look again soon.
        timeout = 10;
      } else if (timed_relays_ > 0) {
        timeout = static_cast<int>(std::max<int64_t>(0, next_tick - MonotonicMs()));
      }
      int count = epoll_wait(epoll_fd(), events, 256, timeout);
      if (count < 0 && errno != EINTR) break;
      for (int i = 0; i < count; i++) {
        auto* endpoint = static_cast<Endpoint*>(events[i].data.ptr);
        if (endpoint == nullptr) {
          RunCommands();
          continue;
        }
        // A relay ended earlier in this batch stays allocated (in the graveyard) until the batch is done, so this
        // check is safe.
        if (endpoint->relay->ended) continue;
        OnEvent(endpoint, events[i].events);
      }
      RunReady();
      RunWaiting();
      if (timed_relays_ > 0 && MonotonicMs() >= next_tick) {
        CheckTimers();
        next_tick = MonotonicMs() + kTimerTickMs;
      }
      graveyard_.clear();
    }
    EndAll("shutdown");
    graveyard_.clear();
    for (Pipe& pipe : idle_pipes_) DestroyPipe(pipe);
    idle_pipes_.clear();
  }

  void OnEvent(Endpoint* endpoint, uint32_t events) {
    Relay* relay = endpoint->relay;
    if (events & EPOLLERR) {
      int err = 0;
      socklen_t length = sizeof err;
      int fd = endpoint->side == 'a' ? relay->fd_a : relay->fd_b;
      if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &length) == 0 && err != 0) {
        End(relay, "error", err, endpoint->side);
        return;
      }
    }
    Pump(relay);
  }

  void Pump(Relay* relay) {
    if (!PumpDirection(relay, relay->ab)) return;
    if (!PumpDirection(relay, relay->ba)) return;
    if (relay->ab.finished && relay->ba.finished) End(relay, "complete", 0, 0);
  }

  void Touch(Relay* relay, Direction& direction, size_t moved) {
    direction.bytes += moved;
    relay->last_activity = MonotonicMs();
    shared_->counters.bytes_total += static_cast<int64_t>(moved);
  }

  // Moves what it can in one direction. Returns false when the relay ended.
  bool PumpDirection(Relay* relay, Direction& d) {
    for (int round = 0; round < kMaxRoundsPerTurn; round++) {
      if (d.finished) return true;
      if (d.preface_sent < d.preface.size()) {
        ssize_t sent = send(d.dst, d.preface.data() + d.preface_sent, d.preface.size() - d.preface_sent,
                            MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent > 0) {
          d.preface_sent += static_cast<size_t>(sent);
          Touch(relay, d, static_cast<size_t>(sent));
          if (d.preface_sent == d.preface.size()) {
            std::string().swap(d.preface);  // frees it: a relay lives for hours, its preface need not
            d.preface_sent = 0;
          }
          continue;
        }
        if (sent < 0 && errno == EINTR) continue;
        if (sent < 0 && errno == EAGAIN) return true;
        return Fail(relay, errno, d.dst_side);
      }
      if (d.copy_mode ? d.buffer_sent < d.buffered : d.in_pipe > 0) {
        ssize_t moved = d.copy_mode
                            ? send(d.dst, d.buffer.data() + d.buffer_sent, d.buffered - d.buffer_sent,
                                   MSG_NOSIGNAL | MSG_DONTWAIT)
                            // Node ignores SIGPIPE process-wide, so a splice into a closed socket reports EPIPE
                            // instead of killing the daemon.
                            : splice(d.pipe.read_end, nullptr, d.dst, nullptr, d.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (moved > 0) {
          if (d.copy_mode) {
            d.buffer_sent += static_cast<size_t>(moved);
          } else {
            d.in_pipe -= static_cast<uint64_t>(moved);
          }
          Touch(relay, d, static_cast<size_t>(moved));
          continue;
        }
        if (moved < 0 && errno == EINTR) continue;
        if (moved < 0 && errno == EAGAIN) return true;  // dst is full: EPOLLOUT brings us back
        if (moved < 0 && errno == EINVAL && !d.copy_mode) {
          // dst cannot take a splice: move what the pipe holds into the copy buffer, and copy from now on.
          if (!SwitchToCopy(d)) return Fail(relay, errno, d.dst_side);
          continue;
        }
        return Fail(relay, moved < 0 ? errno : EPIPE, d.dst_side);
      }
      // Nothing in flight in this direction.
      if (d.eof) {
        // Everything src sent has reached dst: propagate the half-close. ENOTCONN means dst is already shut.
        if (shutdown(d.dst, SHUT_WR) < 0 && errno != ENOTCONN) return Fail(relay, errno, d.dst_side);
        d.finished = true;
        ReturnPipe(d);
        return true;
      }
      if (d.cap > 0 && d.bytes >= d.cap) {
        End(relay, "byte-cap", 0, 0);
        return false;
      }
      uint64_t want = d.cap > 0 ? d.cap - d.bytes : UINT64_MAX;
      ssize_t got;
      if (d.copy_mode) {
        d.buffered = d.buffer_sent = 0;
        got = recv(d.src, d.buffer.data(), std::min<uint64_t>(want, d.buffer.size()), MSG_DONTWAIT);
        if (got > 0) d.buffered = static_cast<size_t>(got);
      } else {
        if (!d.pipe.valid() && !BorrowPipe(relay, d)) return !relay->ended;
        got = splice(d.src, nullptr, d.pipe.write_end, nullptr, std::min<uint64_t>(want, d.pipe.size),
                     SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (got > 0) d.in_pipe = static_cast<uint64_t>(got);
      }
      if (got > 0) continue;
      if (got == 0) {
        d.eof = true;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        // src is drained (the pipe was empty, so it cannot be the pipe that is full): give the pipe back, so an
        // idle relay holds none.
        ReturnPipe(d);
        return true;
      }
      if (errno == EINVAL && !d.copy_mode) {
        // src cannot be spliced from (the pipe is empty here, so nothing is carried over).
        if (!SwitchToCopy(d)) return Fail(relay, errno, d.src_side);
        continue;
      }
      return Fail(relay, errno, d.src_side);
    }
    // Still busy after a full turn: let the other relays on this thread run, and come back.
    if (!relay->queued_ready) {
      relay->queued_ready = true;
      ready_.push_back(relay->id);
    }
    return true;
  }

  // Turns a direction into a copying one, keeping any bytes its pipe holds. False if the pipe cannot be read.
  bool SwitchToCopy(Direction& d) {
    d.copy_mode = true;
    shared_->counters.copy_relays++;
    d.buffer.resize(std::max<size_t>(kCopyBufferSize, d.in_pipe));
    d.buffered = d.buffer_sent = 0;
    while (d.buffered < d.in_pipe) {
      ssize_t got = read(d.pipe.read_end, d.buffer.data() + d.buffered, d.in_pipe - d.buffered);
      if (got <= 0) return false;
      d.buffered += static_cast<size_t>(got);
    }
    d.in_pipe = 0;
    ReturnPipe(d);
    return true;
  }

  bool Fail(Relay* relay, int err, char side) {
    End(relay, "error", err, side);
    return false;
  }

  // Records (or clears) who holds a persistent pipe. One aligned 64-bit store: a crash between two relays'
  // updates leaves every word either old or new, never torn.
  void MarkOwner(const Pipe& pipe, const Relay* relay, const Direction* d) {
    if (pipe.index < 0 || shared_->pipe_owners == nullptr) return;
    uint64_t value = relay == nullptr ? 0 : ((relay->id << 1) | (d == &relay->ba ? 1u : 0u)) + 1;
    __atomic_store_n(&shared_->pipe_owners[pipe.index], value, __ATOMIC_RELEASE);
  }

  bool BorrowPipe(Relay* relay, Direction& d) {
    if (!idle_pipes_.empty()) {
      d.pipe = idle_pipes_.back();
      idle_pipes_.pop_back();
      MarkOwner(d.pipe, relay, &d);
      shared_->counters.pipes_idle--;
      shared_->counters.pipes_in_use++;
      return true;
    }
    // A persistent pool never grows: every pipe it may use was made (and stored) at start.
    if (shared_->settings.persistent_pipes || shared_->pipes_total.fetch_add(1) >= shared_->settings.max_pipes) {
      if (!shared_->settings.persistent_pipes) shared_->pipes_total--;
      shared_->counters.pipe_waits++;
      Wait(relay);
      return false;
    }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
      int err = errno;
      shared_->pipes_total--;
      // Out of fds (EMFILE/ENFILE): if other relays hold pipes, one will come back; if none do, waiting would
      // never end, so the relay fails with the errno.
      if (shared_->counters.pipes_in_use.load() > 0) {
        shared_->counters.pipe_waits++;
        Wait(relay);
      } else {
        End(relay, "error", err, 0);
      }
      return false;
    }
    Pipe pipe{fds[0], fds[1], 0};
    // F_SETPIPE_SZ fails with EPERM for a user over pipe-user-pages-soft without CAP_SYS_RESOURCE; the pipe then
    // keeps the size it was created with (one page once the user is over the soft limit), which still works.
    int size = fcntl(pipe.write_end, F_SETPIPE_SZ, shared_->settings.pipe_size);
    if (size < 0) {
      shared_->counters.pipe_resize_failures++;
      size = fcntl(pipe.write_end, F_GETPIPE_SZ);
    }
    pipe.size = size > 0 ? size : 4096;
    int64_t current = shared_->counters.pipe_size_min.load();
    while ((current == 0 || pipe.size < current) &&
           !shared_->counters.pipe_size_min.compare_exchange_weak(current, pipe.size)) {
    }
    d.pipe = pipe;
    shared_->counters.pipes_in_use++;
    return true;
  }

  // Gives an empty pipe back to the pool (or closes it beyond the idle limit). A pipe that still holds bytes is
  // never pooled (End empties it first, into the envelope).
  void ReturnPipe(Direction& d) {
    if (!d.pipe.valid()) return;
    Pipe pipe = std::exchange(d.pipe, Pipe{});
    shared_->counters.pipes_in_use--;
    MarkOwner(pipe, nullptr, nullptr);
    // A persistent pipe always goes back to the pool (it is stored under its number); any other is pooled
    // up to the idle limit, and never in a persistent engine (its pool is the stored one).
    bool keep = pipe.index >= 0 || (!shared_->settings.persistent_pipes && static_cast<int>(idle_pipes_.size()) < idle_pipe_limit_);
    if (d.in_pipe == 0 && keep) {
      idle_pipes_.push_back(pipe);
      shared_->counters.pipes_idle++;
    } else {
      DestroyPipe(pipe);
    }
    d.in_pipe = 0;
  }

  void DestroyPipe(Pipe& pipe) {
    CloseFd(pipe.read_end);
    CloseFd(pipe.write_end);
    shared_->pipes_total--;
  }

  void Wait(Relay* relay) {
    if (relay->queued_waiting) return;
    relay->queued_waiting = true;
    waiting_.push_back(relay->id);
  }

  bool PipeAvailable() const {
    // A persistent pool never makes new pipes: only an idle one can be had (else waiting relays would be
    // woken for a pipe BorrowPipe will not make, forever).
    if (shared_->settings.persistent_pipes) return !idle_pipes_.empty();
    return !idle_pipes_.empty() || shared_->pipes_total.load() < shared_->settings.max_pipes;
  }

  void RunReady() {
    if (ready_.empty()) return;
    std::deque<uint64_t> ready;
    ready.swap(ready_);
    for (uint64_t id : ready) {
      auto found = relays_.find(id);
      if (found == relays_.end()) continue;
      found->second->queued_ready = false;
      Pump(found->second.get());
    }
  }

  void RunWaiting() {
    while (!waiting_.empty() && PipeAvailable()) {
      uint64_t id = waiting_.front();
      waiting_.pop_front();
      auto found = relays_.find(id);
      if (found == relays_.end()) continue;
      found->second->queued_waiting = false;
      Pump(found->second.get());
    }
  }

  void CheckTimers() {
    int64_t now = MonotonicMs();
    std::vector<std::pair<Relay*, const char*>> expired;
    for (auto& [id, relay] : relays_) {
      if (relay->max_duration_ms > 0 && now - relay->started_mono >= relay->max_duration_ms) {
        expired.emplace_back(relay.get(), "max-duration");
      } else if (relay->idle_timeout_ms > 0 && now - relay->last_activity >= relay->idle_timeout_ms) {
        expired.emplace_back(relay.get(), "idle-timeout");
      }
    }
    for (auto& [relay, reason] : expired) End(relay, reason, 0, 0);
  }

  // Takes what a direction read but did not deliver: what is left of its preface, of its copy buffer and of
  // its pipe, in the order it would have been written.
  std::string TakeUnsent(Direction& d) {
    std::string unsent = d.preface.substr(std::min(d.preface_sent, d.preface.size()));
    if (d.buffer_sent < d.buffered) unsent.append(d.buffer.data() + d.buffer_sent, d.buffered - d.buffer_sent);
    size_t start = unsent.size();
    if (d.pipe.valid() && d.in_pipe > 0) {
      unsent.resize(start + d.in_pipe);
      size_t got = 0;
      while (got < d.in_pipe) {
        ssize_t n = read(d.pipe.read_end, unsent.data() + start + got, d.in_pipe - got);
        if (n <= 0) break;
        got += static_cast<size_t>(n);
      }
      unsent.resize(start + got);
      d.in_pipe = 0;  // emptied: the pipe can go back to the pool
    }
    return unsent;
  }

  void End(Relay* relay, const char* reason, int err, char side) {
    if (relay->ended) return;
    relay->ended = true;
    Unregister(relay);
    std::string unsent_ab = TakeUnsent(relay->ab);
    std::string unsent_ba = TakeUnsent(relay->ba);
    ReturnPipe(relay->ab);
    ReturnPipe(relay->ba);
    if (relay->idle_timeout_ms > 0 || relay->max_duration_ms > 0) timed_relays_--;
    RelayCompletionRecord record;
    record.id = static_cast<double>(relay->id);
    record.reason = reason;
    record.err = err;
    record.side = side;
    record.bytes_ab = relay->ab.bytes;
    record.bytes_ba = relay->ba.bytes;
    record.finished_ab = relay->ab.finished;
    record.finished_ba = relay->ba.finished;
    record.started_at = relay->started_wall;
    record.ended_at = WallMs();
    record.unsent_ab = std::move(unsent_ab);
    record.unsent_ba = std::move(unsent_ba);
    shared_->counters.relays--;
    shared_->completions.Push(std::move(record));
    // Freed after the current epoll batch: later events of the batch may still point at its endpoints.
    auto found = relays_.find(relay->id);
    graveyard_.push_back(std::move(found->second));
    relays_.erase(found);
  }

  std::shared_ptr<SpliceShared> shared_;
  int idle_pipe_limit_;
  std::unordered_map<uint64_t, std::unique_ptr<Relay>> relays_;
  std::vector<std::unique_ptr<Relay>> graveyard_;
  std::deque<uint64_t> ready_;
  std::deque<uint64_t> waiting_;
  std::vector<Pipe> idle_pipes_;
  int timed_relays_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// SpliceEngine: the JS object.

namespace {

std::string BytesField(const Napi::Object& object, const char* name) {
  Napi::Value value = object.Get(name);
  if (value.IsUndefined() || value.IsNull()) return {};
  if (!value.IsTypedArray()) throw Napi::TypeError::New(object.Env(), std::string("\"") + name + "\" must be a Uint8Array");
  auto bytes = value.As<Napi::Uint8Array>();
  return std::string(reinterpret_cast<const char*>(bytes.Data()), bytes.ByteLength());
}


const char* SideName(char side) { return side == 'a' ? "a" : side == 'b' ? "b" : nullptr; }

// A relay between fd_a and fd_b with the limits and prefaces of `options` (RelayOptions), as add() and resume()
// both build it.
std::unique_ptr<Relay> NewRelay(Napi::Env env, double id, int fd_a, int fd_b, const Napi::Object& options) {
  auto relay = std::make_unique<Relay>();
  relay->id = static_cast<uint64_t>(id);
  relay->fd_a = fd_a;
  relay->fd_b = fd_b;
  relay->idle_timeout_ms = static_cast<int64_t>(NumberField(options, "idleTimeoutMs", 0, 0, kMaxSafeInteger));
  relay->max_duration_ms = static_cast<int64_t>(NumberField(options, "maxDurationMs", 0, 0, kMaxSafeInteger));
  relay->ab.cap = static_cast<uint64_t>(NumberField(options, "maxBytesAToB", 0, 0, kMaxSafeInteger));
  relay->ba.cap = static_cast<uint64_t>(NumberField(options, "maxBytesBToA", 0, 0, kMaxSafeInteger));
  relay->ab.preface = BytesField(options, "prefaceAToB");
  relay->ba.preface = BytesField(options, "prefaceBToA");
  relay->ab.src = fd_a, relay->ab.dst = fd_b, relay->ab.src_side = 'a', relay->ab.dst_side = 'b';
  relay->ba.src = fd_b, relay->ba.dst = fd_a, relay->ba.src_side = 'b', relay->ba.dst_side = 'a';
  // The engine needs nonblocking sockets. O_NONBLOCK lives on the open file description, so the sockets come
  // back to their owner nonblocking too (as any socket a Node program holds already is).
  for (int fd : {fd_a, fd_b}) {
    if (MakeNonblocking(fd) < 0) throw ErrnoException(env, errno, "fcntl");
  }
  return relay;
}

Napi::Object PipeObject(Napi::Env env, const int (&fds)[2], uint64_t bytes, int index) {
  Napi::Object pipe = Napi::Object::New(env);
  Napi::Array pair = Napi::Array::New(env, 2);
  pair.Set(0u, fds[0]);
  pair.Set(1u, fds[1]);
  pipe.Set("fds", pair);
  pipe.Set("bytes", static_cast<double>(bytes));
  if (index >= 0) pipe.Set("index", index);
  return pipe;
}

Napi::Object CompletionObject(Napi::Env env, const RelayCompletionRecord& c) {
  Napi::Object object = Napi::Object::New(env);
  object.Set("id", c.id);
  object.Set("reason", c.reason);
  object.Set("errno", c.err);
  object.Set("code", ErrnoName(env, c.err));
  const char* side = SideName(c.side);
  object.Set("side", side ? Napi::Value(Napi::String::New(env, side)) : env.Null());
  object.Set("bytesAToB", static_cast<double>(c.bytes_ab));
  object.Set("bytesBToA", static_cast<double>(c.bytes_ba));
  object.Set("finishedAToB", c.finished_ab);
  object.Set("finishedBToA", c.finished_ba);
  object.Set("startedAt", c.started_at);
  object.Set("endedAt", c.ended_at);
  object.Set("unsentAToB", c.unsent_ab.empty() ? env.Null() : Napi::Value(Napi::Buffer<char>::Copy(env, c.unsent_ab.data(), c.unsent_ab.size())));
  object.Set("unsentBToA", c.unsent_ba.empty() ? env.Null() : Napi::Value(Napi::Buffer<char>::Copy(env, c.unsent_ba.data(), c.unsent_ba.size())));
  return object;
}

}  // namespace

Napi::Function SpliceEngine::DefineClass(Napi::Env env) {
  return ObjectWrap::DefineClass(env, "SpliceEngine",
                                 {
                                     InstanceMethod<&SpliceEngine::Add>("add"),
                                     InstanceMethod<&SpliceEngine::Cancel>("cancel"),
                                     InstanceMethod<&SpliceEngine::EndAll>("endAll"),
                                     InstanceMethod<&SpliceEngine::Snapshot>("snapshot"),
                                     InstanceMethod<&SpliceEngine::Stats>("stats"),
                                     InstanceMethod<&SpliceEngine::PauseAll>("pauseAll"),
                                     InstanceMethod<&SpliceEngine::Resume>("resume"),
                                     InstanceMethod<&SpliceEngine::Close>("close"),
                                     InstanceMethod<&SpliceEngine::Flush>("flush"),
                                     InstanceMethod<&SpliceEngine::PipeTable>("pipeTable"),
                                 });
}

SpliceEngine::SpliceEngine(const Napi::CallbackInfo& info)
    : ObjectWrap(info),
      addon_(Fdferry::Of(info.Env())),
      shared_(std::make_shared<SpliceShared>()),
      events_(info.Env(), "fdferry:SpliceEngine", info.This().As<Napi::Object>()) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsFunction()) {
    throw Napi::TypeError::New(env, "createSpliceEngine(options, onComplete)");
  }
  Napi::Object options = info[0].As<Napi::Object>();
  SpliceSettings& settings = shared_->settings;
  settings.threads = static_cast<int>(NumberField(options, "threads", 1, 1, 64));
  settings.pipe_size = static_cast<int>(NumberField(options, "pipeSize", 256 * 1024, 4096, 1 << 30));
  settings.max_pipes = static_cast<int>(NumberField(options, "maxPipes", 1024, 1, 1 << 20));
  settings.max_idle_pipes = static_cast<int>(NumberField(options, "maxIdlePipes", 64, 0, 1 << 20));
  settings.persistent_pipes = options.Get("persistentPipes").ToBoolean();

  events_.Open<SpliceEngine, &SpliceEngine::DeliverCompletions>(addon_, shared_->completions, this,
                                                                info[1].As<Napi::Function>());
  int idle_per_thread = std::max(0, settings.max_idle_pipes / settings.threads);
  try {
    for (int i = 0; i < settings.threads; i++) threads_.push_back(std::make_unique<SpliceThread>(shared_, idle_per_thread));
    if (settings.persistent_pipes) MakePersistentPool();
  } catch (const std::system_error& error) {
    StopThreads();
    ReleasePipeTable();
    events_.Close();
    throw ErrnoException(env, error);
  }
  addon_.Register(static_cast<LoopResource*>(this));
  // Strong while running: completions call back into this object from the loop.
  Ref();
}

SpliceEngine::~SpliceEngine() {
  StopThreads();
  ReleasePipeTable();
}

void SpliceEngine::MakePersistentPool() {
  const SpliceSettings& settings = shared_->settings;
  size_t bytes = static_cast<size_t>(settings.max_pipes) * sizeof(uint64_t);
  int fd = memfd_create("fdferry-pipe-owners", MFD_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "memfd_create");
  shared_->pipe_table_fd = fd;
  if (ftruncate(fd, static_cast<off_t>(bytes)) < 0) throw std::system_error(errno, std::generic_category(), "ftruncate");
  void* table = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (table == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
  shared_->pipe_owners = static_cast<uint64_t*>(table);
  int per_thread = settings.max_pipes / static_cast<int>(threads_.size());
  int first = 0;
  for (size_t i = 0; i < threads_.size(); i++) {
    int count = i + 1 == threads_.size() ? settings.max_pipes - first : per_thread;
    SpliceThread* thread = threads_[i].get();
    auto made = thread->Call<std::vector<PersistentPipe>>([thread, first, count] { return thread->MakePersistentPipes(first, count); });
    shared_->persistent.insert(shared_->persistent.end(), made.begin(), made.end());
    first += count;
  }
}

void SpliceEngine::ReleasePipeTable() {
  // After the threads are joined: nobody writes the table any more.
  if (shared_->pipe_owners != nullptr) {
    munmap(shared_->pipe_owners, static_cast<size_t>(shared_->settings.max_pipes) * sizeof(uint64_t));
    shared_->pipe_owners = nullptr;
  }
  if (shared_->pipe_table_fd >= 0) close(shared_->pipe_table_fd);
  shared_->pipe_table_fd = -1;
}

Napi::Value SpliceEngine::PipeTable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_ || shared_->pipe_table_fd < 0) return env.Null();
  Napi::Object result = Napi::Object::New(env);
  result.Set("tableFd", shared_->pipe_table_fd);
  Napi::Array pipes = Napi::Array::New(env, shared_->persistent.size());
  uint32_t index = 0;
  for (const PersistentPipe& pipe : shared_->persistent) {
    Napi::Object object = Napi::Object::New(env);
    object.Set("index", pipe.index);
    Napi::Array fds = Napi::Array::New(env, 2);
    fds.Set(0u, pipe.read_end);
    fds.Set(1u, pipe.write_end);
    object.Set("fds", fds);
    pipes.Set(index++, object);
  }
  result.Set("pipes", pipes);
  return result;
}

SpliceThread& SpliceEngine::ThreadFor(double id) {
  return *threads_[static_cast<uint64_t>(id) % threads_.size()];
}

Napi::Value SpliceEngine::Add(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) throw FdferryError(env, "EFDFERRY_CLOSED", "the splice engine is closed");
  if (info.Length() < 4 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsObject()) {
    throw Napi::TypeError::New(env, "add(id, fdA, fdB, options)");
  }
  double id = info[0].As<Napi::Number>().DoubleValue();
  if (!(id >= 0 && id <= kMaxSafeInteger)) throw Napi::RangeError::New(env, "relay id out of range");
  int fd_a = info[1].As<Napi::Number>().Int32Value();
  int fd_b = info[2].As<Napi::Number>().Int32Value();
  auto relay = NewRelay(env, id, fd_a, fd_b, info[3].As<Napi::Object>());
  relay->started_mono = relay->last_activity = MonotonicMs();
  relay->started_wall = WallMs();
  Relay* raw = relay.release();
  ThreadFor(id).Post([thread = &ThreadFor(id), raw] { thread->Add(std::unique_ptr<Relay>(raw)); });
  return env.Undefined();
}

Napi::Value SpliceEngine::Cancel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_ || info.Length() < 1 || !info[0].IsNumber()) return Napi::Boolean::New(env, false);
  double id = info[0].As<Napi::Number>().DoubleValue();
  SpliceThread& thread = ThreadFor(id);
  bool found = thread.Call<bool>([&thread, id] { return thread.Cancel(static_cast<uint64_t>(id), "cancelled"); });
  return Napi::Boolean::New(env, found);
}

void SpliceEngine::EndAll(const Napi::CallbackInfo&) {
  if (closed_) return;
  for (auto& thread : threads_) thread->Post([raw = thread.get()] { raw->EndAll("shutdown"); });
}

Napi::Value SpliceEngine::Snapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array rows = Napi::Array::New(env);
  if (closed_) return rows;
  uint32_t index = 0;
  for (auto& thread : threads_) {
    SpliceThread* raw = thread.get();
    auto snapshot = raw->Call<std::vector<SpliceThread::SnapshotRow>>([raw] { return raw->Snapshot(); });
    for (const auto& row : snapshot) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("id", static_cast<double>(row.id));
      object.Set("bytesAToB", static_cast<double>(row.bytes_ab));
      object.Set("bytesBToA", static_cast<double>(row.bytes_ba));
      object.Set("finishedAToB", row.finished_ab);
      object.Set("finishedBToA", row.finished_ba);
      object.Set("idleMs", static_cast<double>(row.idle_ms));
      object.Set("pipes", row.pipes);
      rows.Set(index++, object);
    }
  }
  return rows;
}

Napi::Value SpliceEngine::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const SpliceCounters& c = shared_->counters;
  Napi::Object stats = Napi::Object::New(env);
  stats.Set("threads", static_cast<double>(threads_.size()));
  stats.Set("relays", static_cast<double>(c.relays.load()));
  stats.Set("pipesInUse", static_cast<double>(c.pipes_in_use.load()));
  stats.Set("pipesIdle", static_cast<double>(c.pipes_idle.load()));
  stats.Set("pipeSizeRequested", shared_->settings.pipe_size);
  stats.Set("pipeResizeFailures", static_cast<double>(c.pipe_resize_failures.load()));
  stats.Set("pipeSizeMin", static_cast<double>(c.pipe_size_min.load()));
  stats.Set("pipeWaits", static_cast<double>(c.pipe_waits.load()));
  stats.Set("copyRelays", static_cast<double>(c.copy_relays.load()));
  stats.Set("bytesTotal", static_cast<double>(c.bytes_total.load()));
  return stats;
}

Napi::Value SpliceEngine::PauseAll(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array paused = Napi::Array::New(env);
  if (closed_) return paused;
  uint32_t index = 0;
  for (auto& thread : threads_) {
    SpliceThread* raw = thread.get();
    auto records = raw->Call<std::vector<PausedRelayRecord>>([raw] { return raw->PauseAll(); });
    for (const auto& r : records) {
      Napi::Object object = Napi::Object::New(env);
      object.Set("id", r.id);
      object.Set("fdA", r.fd_a);
      object.Set("fdB", r.fd_b);
      Napi::Object options = Napi::Object::New(env);
      options.Set("idleTimeoutMs", r.idle_timeout_ms);
      options.Set("maxDurationMs", r.max_duration_ms);
      options.Set("maxBytesAToB", r.max_bytes_ab);
      options.Set("maxBytesBToA", r.max_bytes_ba);
      if (!r.preface_ab.empty()) options.Set("prefaceAToB", Napi::Buffer<char>::Copy(env, r.preface_ab.data(), r.preface_ab.size()));
      if (!r.preface_ba.empty()) options.Set("prefaceBToA", Napi::Buffer<char>::Copy(env, r.preface_ba.data(), r.preface_ba.size()));
      object.Set("options", options);
      object.Set("bytesAToB", static_cast<double>(r.bytes_ab));
      object.Set("bytesBToA", static_cast<double>(r.bytes_ba));
      object.Set("finishedAToB", r.finished_ab);
      object.Set("finishedBToA", r.finished_ba);
      object.Set("eofAToB", r.eof_ab);
      object.Set("eofBToA", r.eof_ba);
      object.Set("pipeAToB", r.pipe_ab[0] >= 0 ? PipeObject(env, r.pipe_ab, r.pipe_bytes_ab, r.pipe_index_ab) : env.Null());
      object.Set("pipeBToA", r.pipe_ba[0] >= 0 ? PipeObject(env, r.pipe_ba, r.pipe_bytes_ba, r.pipe_index_ba) : env.Null());
      object.Set("startedAt", r.started_at);
      paused.Set(index++, object);
    }
  }
  return paused;
}

void SpliceEngine::Resume(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) throw FdferryError(env, "EFDFERRY_CLOSED", "the splice engine is closed");
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "resume(pausedRelay)");
  Napi::Object record = info[0].As<Napi::Object>();
  double id = NumberField(record, "id", -1, 0, kMaxSafeInteger);
  int fd_a = static_cast<int>(NumberField(record, "fdA", -1, 0, 1 << 30));
  int fd_b = static_cast<int>(NumberField(record, "fdB", -1, 0, 1 << 30));
  Napi::Value options_value = record.Get("options");
  if (!options_value.IsObject()) throw Napi::TypeError::New(env, "\"options\" must be an object");
  auto relay = NewRelay(env, id, fd_a, fd_b, options_value.As<Napi::Object>());
  relay->ab.bytes = static_cast<uint64_t>(NumberField(record, "bytesAToB", 0, 0, kMaxSafeInteger));
  relay->ba.bytes = static_cast<uint64_t>(NumberField(record, "bytesBToA", 0, 0, kMaxSafeInteger));
  relay->ab.finished = record.Get("finishedAToB").ToBoolean();
  relay->ba.finished = record.Get("finishedBToA").ToBoolean();
  relay->ab.eof = record.Get("eofAToB").ToBoolean() || relay->ab.finished;
  relay->ba.eof = record.Get("eofBToA").ToBoolean() || relay->ba.finished;
  int adopted = 0;
  for (auto [name, direction] : {std::pair{"pipeAToB", &relay->ab}, std::pair{"pipeBToA", &relay->ba}}) {
    Napi::Value pipe_value = record.Get(name);
    if (pipe_value.IsNull() || pipe_value.IsUndefined()) continue;
    if (!pipe_value.IsObject()) throw Napi::TypeError::New(env, std::string("\"") + name + "\" must be an object or null");
    Napi::Object pipe = pipe_value.As<Napi::Object>();
    Napi::Value fds_value = pipe.Get("fds");
    if (!fds_value.IsArray() || fds_value.As<Napi::Array>().Length() != 2) {
      throw Napi::TypeError::New(env, std::string("\"") + name + ".fds\" must be [readFd, writeFd]");
    }
    Napi::Array fds = fds_value.As<Napi::Array>();
    direction->pipe.read_end = fds.Get(0u).As<Napi::Number>().Int32Value();
    direction->pipe.write_end = fds.Get(1u).As<Napi::Number>().Int32Value();
    int size = fcntl(direction->pipe.write_end, F_GETPIPE_SZ);
    if (size < 0) throw ErrnoException(env, errno, "fcntl");
    direction->pipe.size = size;
    direction->in_pipe = static_cast<uint64_t>(NumberField(pipe, "bytes", 0, 0, kMaxSafeInteger));
    // A number is given back only on a rollback, to the engine that numbered the pipe: it rejoins the pool.
    double index = NumberField(pipe, "index", -1, -1, kMaxSafeInteger);
    if (shared_->settings.persistent_pipes && index >= 0 && index < shared_->settings.max_pipes) direction->pipe.index = static_cast<int>(index);
    adopted++;
  }
  // From here the pipes are the engine's: they count toward the pipe budget like any it created.
  shared_->pipes_total += adopted;
  shared_->counters.pipes_in_use += adopted;
  double started_at = NumberField(record, "startedAt", WallMs(), 0, kMaxSafeInteger);
  relay->started_wall = started_at;
  relay->started_mono = MonotonicMs() - static_cast<int64_t>(std::max(0.0, WallMs() - started_at));
  relay->last_activity = MonotonicMs();
  Relay* raw = relay.release();
  ThreadFor(id).Post([thread = &ThreadFor(id), raw] { thread->Add(std::unique_ptr<Relay>(raw)); });
}

void SpliceEngine::Flush(const Napi::CallbackInfo&) {
  // Completions already in the outbox are reported now rather than on the next loop turn: a hand-over pauses
  // every relay and must see the ones that ended just before as ended, not as running.
  if (!closed_) DeliverCompletions();
}

void SpliceEngine::StopThreads() {
  for (auto& thread : threads_) thread->Stop();
  threads_.clear();
}

void SpliceEngine::Close(const Napi::CallbackInfo& info) {
  if (closed_) return;
  StopThreads();
  // Completions produced while stopping (relays that ended "shutdown") are delivered before the handle goes.
  DeliverCompletions();
  CloseForTeardown();
  (void)info;
}

void SpliceEngine::CloseForTeardown() {
  if (closed_) return;
  closed_ = true;
  StopThreads();
  ReleasePipeTable();
  events_.Close();
  addon_.Unregister(static_cast<LoopResource*>(this));
  Unref();
}

void SpliceEngine::DeliverCompletions() { events_.Deliver(Value(), CompletionObject); }

namespace {

Napi::Value CreateSpliceEngine(const Napi::CallbackInfo& info) {
  return Construct(Fdferry::Of(info.Env()).spliceEngineClass, info, 2);
}

}  // namespace

void InitSpliceEngine(Napi::Env env, Napi::Object exports, Fdferry& addon) {
  addon.spliceEngineClass = Napi::Persistent(SpliceEngine::DefineClass(env));
  exports.Set("createSpliceEngine", Napi::Function::New(env, CreateSpliceEngine, "createSpliceEngine"));
}

}  // namespace fdferry
