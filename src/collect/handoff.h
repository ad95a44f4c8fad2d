// Hands items from one thread to another, at most `capacity` waiting (collect's tokenizer and
// store stages).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>

namespace moetrace {

template <class T>
class HandOff {
 public:
  explicit HandOff(size_t capacity) : capacity_(capacity) {}
  // Waits while full. False, and nothing queued, once the consumer has stopped.
  bool push(T item) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return queue_.size() < capacity_ || stopped_; });
    if (stopped_) return false;
    queue_.push_back(std::move(item));
    cv_.notify_all();
    return true;
  }
  // Waits for an item; nullopt once the producer has finished and everything is taken, or the
  // consumer has stopped.
  std::optional<T> pop() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || finished_ || stopped_; });
    if (queue_.empty() || stopped_) return std::nullopt;
    T item = std::move(queue_.front());
    queue_.pop_front();
    cv_.notify_all();
    return item;
  }
  void finish() { set(&finished_); }  // producer: nothing more will come
  void stop() { set(&stopped_); }     // consumer: takes nothing more (a waiting push returns)

 private:
  void set(bool* flag) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      *flag = true;
    }
    cv_.notify_all();
  }
  size_t capacity_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> queue_;
  bool finished_ = false, stopped_ = false;
};

}  // namespace moetrace
