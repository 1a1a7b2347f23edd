// Status / StatusOr: failures a user can cause (bad files, bad flags, bad requests).
// Broken invariants use MM_CHECK instead.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

namespace moemesh {

class [[nodiscard]] Status {
public:
    Status() = default;
    static Status ok_status() { return Status(); }
    static Status error(std::string msg) {
        Status s;
        s.ok_ = false;
        s.msg_ = std::move(msg);
        return s;
    }
    bool ok() const { return ok_; }
    const std::string& message() const { return msg_; }

private:
    bool ok_ = true;
    std::string msg_;
};

template <class T>
class [[nodiscard]] StatusOr {
public:
    StatusOr(T value) : value_(std::move(value)) {}              // NOLINT(implicit)
    StatusOr(Status status) : status_(std::move(status)) {       // NOLINT(implicit)
        if (status_.ok()) status_ = Status::error("internal: StatusOr built from an ok Status");
    }
    bool ok() const { return value_.has_value(); }
    const Status& status() const { return status_; }
    // The value; asking an error for one is a broken invariant (the error printed, then abort).
    T& value() & { return *checked(); }
    const T& value() const& { return *const_cast<StatusOr*>(this)->checked(); }
    T&& value() && { return std::move(*checked()); }
    T* operator->() { return &*value_; }
    const T* operator->() const { return &*value_; }
    T& operator*() { return *value_; }

private:
    std::optional<T>& checked() {
        if (!value_.has_value()) {
            std::fprintf(stderr, "StatusOr::value() of an error: %s\n", status_.message().c_str());
            std::abort();
        }
        return value_;
    }
    std::optional<T> value_;
    Status status_;
};

std::string str_printf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

#define MM_ERROR(...) ::moemesh::Status::error(::moemesh::str_printf(__VA_ARGS__))

#define MM_CONCAT_INNER(a, b) a##b
#define MM_CONCAT(a, b) MM_CONCAT_INNER(a, b)
#define MM_RETURN_IF_ERROR(expr)                 \
    do {                                         \
        ::moemesh::Status _st = (expr);          \
        if (!_st.ok()) return _st;               \
    } while (0)
#define MM_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
    auto tmp = (expr);                           \
    if (!tmp.ok()) return tmp.status();          \
    lhs = std::move(tmp).value()
#define MM_ASSIGN_OR_RETURN(lhs, expr) MM_ASSIGN_OR_RETURN_IMPL(MM_CONCAT(_so_, __LINE__), lhs, expr)

}  // namespace moemesh

#define MM_CHECK(cond)                                                                    \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            std::abort();                                                                 \
        }                                                                                 \
    } while (0)
