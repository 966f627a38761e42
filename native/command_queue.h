// Commands for an epoll thread from other threads: a mutex-protected queue and an eventfd that the thread
// polls. The JS thread posts (add a relay, start an upgrade) or calls and waits for the answer (snapshot,
// pause), so the thread that owns the data path takes no lock on its own state.
//
// Man pages: eventfd(2), epoll(7).
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <system_error>
#include <utility>
#include <vector>

namespace fdferry {

class CommandQueue {
 public:
  CommandQueue() : wake_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
    if (wake_fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
  }
  ~CommandQueue() { close(wake_fd_); }
  CommandQueue(const CommandQueue&) = delete;
  CommandQueue& operator=(const CommandQueue&) = delete;

  // The fd the owning thread adds to its epoll set (readable when commands wait).
  int fd() const { return wake_fd_; }

  // Runs `command` on the owning thread, soon.
  void Post(std::function<void()> command) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      commands_.push_back(std::move(command));
    }
    uint64_t one = 1;
    ssize_t ignored = write(wake_fd_, &one, sizeof one);
    (void)ignored;  // the counter cannot overflow in practice; a failed wake-up would be EAGAIN at 2^64-1
  }

  // Runs `fn` on the owning thread and waits for its result (an exception it throws is rethrown here).
  template <typename Result>
  Result Call(std::function<Result()> fn) {
    auto task = std::make_shared<std::packaged_task<Result()>>(std::move(fn));
    std::future<Result> result = task->get_future();
    Post([task] { (*task)(); });
    return result.get();
  }

  // On the owning thread, when fd() is readable: runs every command posted so far, in order.
  void RunPending() {
    uint64_t counter;
    ssize_t ignored = read(wake_fd_, &counter, sizeof counter);
    (void)ignored;
    std::vector<std::function<void()>> commands;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      commands.swap(commands_);
    }
    for (auto& command : commands) command();
  }

 private:
  int wake_fd_;
  std::mutex mutex_;
  std::vector<std::function<void()>> commands_;
};

}  // namespace fdferry
