// One epoll thread of a native engine: the epoll set, the command queue whose eventfd sits in it, and the
// std::thread that waits on it. What else is in the set, what an event's data.ptr points at, the timeouts and the
// batching belong to each engine (its Run()); this is only the part they all start and stop the same way.
//
// Man pages: epoll(7), epoll_create1(2), epoll_ctl(2), eventfd(2), pthread_sigmask(3).
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>

#include <cerrno>
#include <functional>
#include <system_error>
#include <thread>
#include <utility>

#include "command_queue.h"
#include "fd.h"

namespace fdferry {

class EngineThread {
 public:
  // Creates the epoll set with the command queue's eventfd in it; the eventfd's events carry `wake_tag` as their
  // data.ptr. Throws std::system_error named for the failing syscall (eventfd, epoll_create1, epoll_ctl).
  explicit EngineThread(void* wake_tag) {
    epoll_.reset(epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_.valid()) throw std::system_error(errno, std::generic_category(), "epoll_create1");
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.ptr = wake_tag;
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, commands_.fd(), &event) < 0) {
      throw std::system_error(errno, std::generic_category(), "epoll_ctl");
    }
  }

  // A derived engine thread calls Stop() in its own destructor: the thread runs the derived object's members,
  // which are gone by the time this destructor runs. This Stop() is only the backstop.
  ~EngineThread() { Stop(); }
  EngineThread(const EngineThread&) = delete;
  EngineThread& operator=(const EngineThread&) = delete;

  // Runs `command` on the thread, soon.
  void Post(std::function<void()> command) { commands_.Post(std::move(command)); }

  // Runs `fn` on the thread and waits for its result: for the synchronous calls (snapshot, stats, pause).
  template <typename Result>
  Result Call(std::function<Result()> fn) {
    return commands_.template Call<Result>(std::move(fn));
  }

  // Has the loop leave at its next turn and joins the thread. Idempotent; only for the thread that started it.
  void Stop() {
    if (!thread_.joinable()) return;
    Post([this] { stopping_ = true; });
    thread_.join();
  }

 protected:
  int epoll_fd() const { return epoll_.get(); }

  // Starts `run` (the engine's loop) on the thread, last thing in the derived constructor. The thread starts with
  // every signal blocked, so no process signal (SIGINT, SIGCHLD...) is ever delivered to it: blocking them inside
  // the thread would leave a window. The caller's mask is restored right after. Throws std::system_error
  // named "pthread_create".
  template <typename Run>
  void Start(Run&& run) {
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    try {
      thread_ = std::thread(std::forward<Run>(run));
    } catch (const std::system_error& error) {
      pthread_sigmask(SIG_SETMASK, &previous, nullptr);
      throw std::system_error(error.code(), "pthread_create");
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }

  // On the thread: whether Stop() has been asked for (the loop's condition).
  bool stopping() const { return stopping_; }
  // On the thread, when the wake tag's event comes: runs the commands posted so far. An exception a command
  // throws travels back to a Call()er through its packaged task, but one from a Post()ed command would end the
  // thread (std::terminate), so those catch their own.
  void RunCommands() { commands_.RunPending(); }

 private:
  FileDescriptor epoll_;
  CommandQueue commands_;
  std::thread thread_;
  bool stopping_ = false;  // touched only by the thread (set by a posted command)
};

}  // namespace fdferry
