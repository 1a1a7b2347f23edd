// Placement YAML -> ClusterConfig -> OwnershipMap. See placement.h for the file format and for which
// check lives where. yaml-cpp only parses; every value goes through the typed readers below, which
// never throw and always say where (file:line:col) and what was wrong.
#include "common/placement.h"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <set>
#include <sstream>

#include "common/arch.h"

namespace moemesh {

namespace {

constexpr size_t kMaxYamlBytes = 16u << 20;
// yaml-cpp parses flow collections recursively; very deep nesting would overflow the stack.
constexpr int kMaxNesting = 64;
constexpr size_t kMaxUnixPath = 107;  // sizeof(sockaddr_un::sun_path) - 1
constexpr int kMaxDataPlaneRows = 65536;  // as the worker's limit (worker/data_plane.h)

std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

std::string trim(const std::string& s) {
    size_t b = s.find_first_not_of(" \t");
    if (b == std::string::npos) return "";
    size_t e = s.find_last_not_of(" \t");
    return s.substr(b, e - b + 1);
}

size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
        cur[0] = i;
        for (size_t j = 1; j <= b.size(); ++j)
            cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
        std::swap(prev, cur);
    }
    return prev[b.size()];
}

// " (did you mean 'experts'?)" or "".
std::string suggestion(const std::string& word, const std::vector<std::string>& candidates) {
    if (word.size() > 64) return "";
    std::string best;
    size_t best_d = std::max<size_t>(2, word.size() / 3) + 1;
    for (const auto& c : candidates) {
        size_t d = edit_distance(lower(word), c);
        if (d < best_d) {
            best_d = d;
            best = c;
        }
    }
    return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

std::string join(const std::vector<std::string>& v, const char* sep) {
    std::string s;
    for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
    return s;
}

// Shortens user text quoted in messages (fuzzed input can be megabytes long).
std::string clip(const std::string& s) { return s.size() > 80 ? s.substr(0, 77) + "..." : s; }

struct RangeItem {
    int lo = 0, hi = 0;
    size_t offset = 0, length = 0;  // where the item is in the text
};

// Syntax only; errors are reasons without a location.
StatusOr<std::vector<RangeItem>> parse_range_items(const std::string& text) {
    std::vector<RangeItem> items;
    if (trim(text).empty()) return MM_ERROR("empty id list");
    size_t pos = 0;
    while (pos <= text.size()) {
        size_t comma = text.find(',', pos);
        if (comma == std::string::npos) comma = text.size();
        std::string raw = text.substr(pos, comma - pos);
        size_t lead = raw.find_first_not_of(" \t");
        std::string item = trim(raw);
        if (item.empty()) return MM_ERROR("empty item in id list \"%s\"", clip(text).c_str());
        RangeItem r;
        r.offset = pos + lead;
        r.length = item.size();
        auto parse_id = [&](const std::string& s, int* out) -> bool {
            if (s.empty() || s.size() > 9) return false;
            for (char c : s)
                if (!std::isdigit(static_cast<unsigned char>(c))) return false;
            *out = std::stoi(s);
            return true;
        };
        size_t dash = item.find('-');
        bool ok;
        if (dash == std::string::npos) {
            ok = parse_id(item, &r.lo);
            r.hi = r.lo;
        } else {
            ok = parse_id(trim(item.substr(0, dash)), &r.lo) && parse_id(trim(item.substr(dash + 1)), &r.hi);
        }
        if (!ok) return MM_ERROR("bad id range \"%s\" (expected N or N-M, e.g. \"0-31,40\")", clip(item).c_str());
        if (r.lo > r.hi) return MM_ERROR("range \"%s\" is reversed (write %d-%d)", item.c_str(), r.hi, r.lo);
        items.push_back(r);
        pos = comma + 1;
        if (comma == text.size()) break;
    }
    std::vector<size_t> order(items.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return items[a].lo < items[b].lo; });
    for (size_t i = 1; i < order.size(); ++i) {
        const RangeItem& a = items[order[i - 1]];
        const RangeItem& b = items[order[i]];
        if (b.lo <= a.hi)
            return MM_ERROR("ranges \"%s\" and \"%s\" overlap", text.substr(a.offset, a.length).c_str(),
                            text.substr(b.offset, b.length).c_str());
    }
    std::vector<RangeItem> sorted;
    for (size_t i : order) sorted.push_back(items[i]);
    return sorted;
}

bool ranges_overlap(const IdRanges& a, const IdRanges& b, std::pair<int, int>* ra, std::pair<int, int>* rb) {
    for (const auto& x : a)
        for (const auto& y : b)
            if (x.first <= y.second && y.first <= x.second) {
                *ra = x;
                *rb = y;
                return true;
            }
    return false;
}

std::string range_text(std::pair<int, int> r) {
    return r.first == r.second ? std::to_string(r.first) : str_printf("%d-%d", r.first, r.second);
}

const std::vector<std::string> kTopKeys = {"model", "activations", "coordinator", "workers"};
const std::vector<std::string> kCoordinatorKeys = {"device", "http", "control", "threads", "timeout_ms",
                                                   "data_plane_rows"};
const std::vector<std::string> kWorkerKeys = {"name",  "address", "device",  "transport", "threads",
                                              "cache", "experts", "layers", "replicas",  "tls"};
const std::vector<std::string> kCacheKeys = {"device", "host", "policy", "prefetch", "profile", "storage"};
const std::vector<std::string> kCachePolicies = {"lru", "lfu", "static"};
const std::vector<std::string> kPrefetchModes = {"none", "next-layer"};
const std::vector<std::string> kStorageModes = {"auto", "pread", "io_uring"};
const std::vector<std::string> kTlsKeys = {"ca", "cert", "key"};
const std::vector<std::string> kTransports = {"auto", "inproc", "unix", "tcp", "nccl", "cuda-ipc", "shm"};

struct Field {
    std::string key;
    YAML::Node key_node;
    YAML::Node value;
};

const char* node_kind(const YAML::Node& n) {
    switch (n.Type()) {
        case YAML::NodeType::Map: return "a map";
        case YAML::NodeType::Sequence: return "a list";
        case YAML::NodeType::Null: return "nothing";
        case YAML::NodeType::Scalar: return "a scalar";
        default: return "an undefined value";
    }
}

// yaml-cpp parses nested collections recursively: very deep nesting would overflow the stack. Counting
// brackets everywhere (even inside quotes) is crude, but only a file with 64 unclosed brackets trips it.
Status check_nesting(const std::string& text, const std::string& name) {
    int depth = 0, line = 1, col = 0;
    for (char c : text) {
        ++col;
        if (c == '\n') {
            ++line;
            col = 0;
        } else if (c == '[' || c == '{') {
            if (++depth > kMaxNesting)
                return MM_ERROR("%s:%d:%d: nesting deeper than %d levels", name.c_str(), line, col, kMaxNesting);
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
    // Block nesting: "- - - - x" or long runs of indentation also recurse in yaml-cpp.
    line = 1;
    size_t start = 0;
    while (start < text.size()) {
        size_t end = text.find('\n', start);
        if (end == std::string::npos) end = text.size();
        int dashes = 0;
        size_t i = start;
        while (i < end && (text[i] == ' ' || text[i] == '-' || text[i] == '?' || text[i] == ':')) {
            if (text[i] != ' ') ++dashes;
            ++i;
        }
        if (dashes > kMaxNesting || i - start > 4096)
            return MM_ERROR("%s:%d:1: nesting deeper than %d levels", name.c_str(), line, kMaxNesting);
        start = end + 1;
        ++line;
    }
    return Status();
}

class Parser {
public:
    Parser(const std::string& text, std::string name, std::string base_dir)
        : name_(std::move(name)), base_dir_(std::move(base_dir)) {
        std::istringstream in(text);
        std::string l;
        while (std::getline(in, l)) lines_.push_back(l);
        cfg_.source = name_;
    }

    StatusOr<ClusterConfig> run(const YAML::Node& root);

private:
    SourceLoc loc(const YAML::Node& n) const {
        YAML::Mark m = n.Mark();
        if (m.line < 0 || m.column < 0) return {};
        return {m.line + 1, m.column + 1};
    }
    // Column of byte `offset` of a single-line scalar; the scalar's own column if the source does not match.
    SourceLoc sub_loc(const YAML::Node& n, size_t offset) const {
        SourceLoc l = loc(n);
        if (l.line == 0 || static_cast<size_t>(l.line) > lines_.size()) return l;
        const std::string& src = lines_[l.line - 1];
        size_t c0 = l.col - 1;
        if (c0 >= src.size()) return l;
        size_t q = (src[c0] == '"' || src[c0] == '\'') ? 1 : 0;
        const std::string& v = n.Scalar();
        if (offset > v.size() || src.compare(c0 + q, offset, v, 0, offset) != 0) return l;
        return {l.line, static_cast<int>(c0 + q + offset + 1)};
    }
    Status err(SourceLoc l, const std::string& ctx, const std::string& msg) const {
        return Status::error(cfg_.where(l) + ctx + msg);
    }
    Status err(const YAML::Node& n, const std::string& ctx, const std::string& msg) const {
        return err(loc(n), ctx, msg);
    }

    // Checks a map's keys (strings, known, not repeated) and returns its fields.
    StatusOr<std::vector<Field>> fields(const YAML::Node& map, const std::vector<std::string>& allowed,
                                        const std::string& ctx) const {
        std::vector<Field> out;
        std::set<std::string> seen;
        for (const auto& kv : map) {
            const YAML::Node k = kv.first;
            if (!k.IsScalar()) return err(k.IsNull() ? map : k, ctx, "keys must be plain names");
            std::string key = k.Scalar();
            if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
                return err(k, ctx,
                           "unknown key '" + clip(key) + "'" + suggestion(key, allowed) + " (allowed: " +
                               join(allowed, ", ") + ")");
            if (!seen.insert(key).second) return err(k, ctx, "duplicate key '" + key + "'");
            out.push_back({key, k, kv.second});
        }
        return out;
    }
    static const Field* find(const std::vector<Field>& fs, const char* key) {
        for (const auto& f : fs)
            if (f.key == key) return &f;
        return nullptr;
    }
    // The value's location, or its key's when the value is empty.
    SourceLoc value_loc(const Field& f) const {
        SourceLoc l = loc(f.value);
        return (l.line == 0 || f.value.IsNull()) ? loc(f.key_node) : l;
    }
    StatusOr<std::string> scalar(const Field& f, const std::string& ctx, const char* what) const {
        if (!f.value.IsScalar())
            return err(value_loc(f), ctx, str_printf("'%s' must be %s, got %s", f.key.c_str(), what, node_kind(f.value)));
        return f.value.Scalar();
    }
    StatusOr<int> integer(const Field& f, const std::string& ctx, int lo, int hi) const {
        MM_ASSIGN_OR_RETURN(std::string s, scalar(f, ctx, "an integer"));
        long long v = 0;
        auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (ec != std::errc() || p != s.data() + s.size())
            return err(value_loc(f), ctx, str_printf("'%s' must be an integer, got \"%s\"", f.key.c_str(), clip(s).c_str()));
        if (v < lo || v > hi)
            return err(value_loc(f), ctx, str_printf("'%s' = %lld is out of range (%d-%d)", f.key.c_str(), v, lo, hi));
        return static_cast<int>(v);
    }
    StatusOr<uint64_t> size(const Field& f, const std::string& ctx) const {
        MM_ASSIGN_OR_RETURN(std::string s, scalar(f, ctx, "a size such as 12GiB"));
        auto r = parse_size(s);
        if (!r.ok()) return err(value_loc(f), ctx, "'" + f.key + "': " + r.status().message());
        return r.value();
    }
    StatusOr<Address> address(const Field& f, const std::string& ctx) const {
        MM_ASSIGN_OR_RETURN(std::string s, scalar(f, ctx, "an address"));
        auto r = parse_address(s);
        if (!r.ok()) return err(value_loc(f), ctx, "'" + f.key + "': " + r.status().message());
        return r.value();
    }
    StatusOr<Device> device(const Field& f, const std::string& ctx) const {
        MM_ASSIGN_OR_RETURN(std::string s, scalar(f, ctx, "a device"));
        auto r = parse_device(s);
        if (!r.ok()) return err(value_loc(f), ctx, r.status().message());
        return r.value();
    }
    std::string path(const std::string& p) const {
        if (p.empty() || p[0] == '/' || base_dir_.empty()) return p;
        return (std::filesystem::path(base_dir_) / p).lexically_normal().string();
    }

    Status parse_coordinator(const Field& f);
    Status parse_worker(const YAML::Node& n, size_t index);
    StatusOr<OwnershipRule> parse_rule(const YAML::Node* layers_key, const YAML::Node& experts,
                                       const std::string& ctx) const;
    StatusOr<std::vector<OwnershipRule>> parse_layer_map(const Field& f, const std::string& ctx) const;

    std::string name_, base_dir_;
    std::vector<std::string> lines_;
    ClusterConfig cfg_;
};

StatusOr<ClusterConfig> Parser::run(const YAML::Node& root) {
    if (!root.IsDefined() || root.IsNull())
        return Status::error(name_ + ": the file is empty (expected a map with 'model' and 'workers')");
    if (!root.IsMap())
        return err(root, "", std::string("the file must be a map with 'model' and 'workers', got ") + node_kind(root));
    MM_ASSIGN_OR_RETURN(std::vector<Field> fs, fields(root, kTopKeys, ""));
    if (const Field* f = find(fs, "model")) {
        MM_ASSIGN_OR_RETURN(std::string m, scalar(*f, "", "a path"));
        if (m.empty()) return err(value_loc(*f), "", "'model' is empty");
        cfg_.model_path = path(m);
    }
    if (const Field* f = find(fs, "activations")) {
        MM_ASSIGN_OR_RETURN(std::string a, scalar(*f, "", "f32 or bf16"));
        if (a == "f32") cfg_.activations = ActivationFormat::kF32;
        else if (a == "bf16") cfg_.activations = ActivationFormat::kBf16;
        else return err(value_loc(*f), "", "'activations' must be f32 or bf16, got \"" + clip(a) + "\"");
    }
    if (const Field* f = find(fs, "coordinator")) MM_RETURN_IF_ERROR(parse_coordinator(*f));
    const Field* w = find(fs, "workers");
    if (!w) return err(root, "", "missing 'workers' (the list of worker processes)");
    cfg_.workers_loc = loc(w->key_node);
    if (!w->value.IsSequence())
        return err(value_loc(*w), "", std::string("'workers' must be a list of workers, got ") + node_kind(w->value));
    if (w->value.size() == 0) return err(value_loc(*w), "", "'workers' is empty");
    size_t i = 0;
    for (const auto& item : w->value) MM_RETURN_IF_ERROR(parse_worker(item, i++));

    // Cross-worker checks: names and addresses are unique (also against the coordinator's own).
    for (size_t a = 0; a < cfg_.workers.size(); ++a) {
        const WorkerConfig& wa = cfg_.workers[a];
        for (size_t b = 0; b < a; ++b) {
            const WorkerConfig& wb = cfg_.workers[b];
            if (wa.name == wb.name)
                return err(wa.name_loc, "", str_printf("worker name '%s' is used twice (first at line %d)",
                                                       wa.name.c_str(), wb.name_loc.line));
            if (wa.address && wb.address && *wa.address == *wb.address)
                return err(wa.address_loc, "worker '" + wa.name + "': ",
                           str_printf("address %s is already used by worker '%s' (line %d)",
                                      wa.address->str().c_str(), wb.name.c_str(), wb.address_loc.line));
        }
        if ((wa.transport == Transport::kNccl || wa.transport == Transport::kCudaIpc) &&
            cfg_.coordinator.device.kind != Device::Kind::kCuda)
            return err(wa.transport_loc, "worker '" + wa.name + "': ",
                       str_printf("transport %s needs the coordinator on a cuda:N device too (coordinator: device is "
                                  "%s); use shm or auto for a CPU coordinator",
                                  transport_name(wa.transport), cfg_.coordinator.device.str().c_str()));
        for (const auto* ca : {&cfg_.coordinator.http, &cfg_.coordinator.control}) {
            if (wa.address && *ca && *wa.address == **ca)
                return err(wa.address_loc, "worker '" + wa.name + "': ",
                           str_printf("address %s is the coordinator's %s address", wa.address->str().c_str(),
                                      ca == &cfg_.coordinator.http ? "http" : "control"));
        }
    }
    return std::move(cfg_);
}

Status Parser::parse_coordinator(const Field& f) {
    const std::string ctx = "coordinator: ";
    if (f.value.IsNull()) return Status();
    if (!f.value.IsMap())
        return err(value_loc(f), "", std::string("'coordinator' must be a map, got ") + node_kind(f.value));
    MM_ASSIGN_OR_RETURN(std::vector<Field> fs, fields(f.value, kCoordinatorKeys, ctx));
    CoordinatorConfig& c = cfg_.coordinator;
    if (const Field* x = find(fs, "device")) {
        MM_ASSIGN_OR_RETURN(c.device, device(*x, ctx));
    }
    if (const Field* x = find(fs, "http")) {
        MM_ASSIGN_OR_RETURN(c.http, address(*x, ctx));
    }
    if (const Field* x = find(fs, "control")) {
        MM_ASSIGN_OR_RETURN(c.control, address(*x, ctx));
    }
    if (const Field* x = find(fs, "threads")) {
        MM_ASSIGN_OR_RETURN(c.threads, integer(*x, ctx, 0, 4096));
    }
    if (const Field* x = find(fs, "timeout_ms")) {
        MM_ASSIGN_OR_RETURN(c.timeout_ms, integer(*x, ctx, 1, 3600000));
    }
    if (const Field* x = find(fs, "data_plane_rows")) {
        MM_ASSIGN_OR_RETURN(c.data_plane_rows, integer(*x, ctx, 1, kMaxDataPlaneRows));
    }
    if (c.http && c.control && *c.http == *c.control)
        return err(value_loc(*find(fs, "control")), ctx, "'control' and 'http' are the same address");
    return Status();
}

// One rule: `experts_node` holds expert ranges; `layers_key` (null for `experts:`) the layer ranges.
StatusOr<OwnershipRule> Parser::parse_rule(const YAML::Node* layers_key, const YAML::Node& experts,
                                           const std::string& ctx) const {
    OwnershipRule r;
    auto parse_one = [&](const YAML::Node& n, const char* what, IdRanges* out, std::string* text, SourceLoc* l,
                         std::vector<SourceLoc>* locs) -> Status {
        if (!n.IsScalar())
            return err(n.IsNull() && layers_key ? loc(*layers_key) : loc(n), ctx,
                       str_printf("%s must be a range list such as \"0-31,40\", got %s", what, node_kind(n)));
        *text = n.Scalar();
        *l = loc(n);
        auto items = parse_range_items(*text);
        if (!items.ok()) return err(n, ctx, std::string(what) + ": " + items.status().message());
        for (const auto& it : items.value()) {
            out->push_back({it.lo, it.hi});
            locs->push_back(sub_loc(n, it.offset));
        }
        return Status();
    };
    if (layers_key) {
        MM_RETURN_IF_ERROR(
            parse_one(*layers_key, "layer ids", &r.layers, &r.layers_text, &r.layers_loc, &r.layer_range_locs));
    } else {
        r.all_layers = true;
    }
    YAML::Node e = experts;
    if (e.IsNull() && layers_key) {
        return err(loc(*layers_key), ctx, "layers \"" + clip(r.layers_text) + "\" have no expert ids");
    }
    MM_RETURN_IF_ERROR(parse_one(e, "expert ids", &r.experts, &r.experts_text, &r.experts_loc, &r.expert_range_locs));
    return r;
}

StatusOr<std::vector<OwnershipRule>> Parser::parse_layer_map(const Field& f, const std::string& ctx) const {
    if (!f.value.IsMap())
        return err(value_loc(f), ctx,
                   str_printf("'%s' must be a map of layer ranges to expert ranges, e.g. {\"0-23\": \"0-31\"}, got %s",
                              f.key.c_str(), node_kind(f.value)));
    if (f.value.size() == 0) return err(value_loc(f), ctx, "'" + f.key + "' is empty");
    std::vector<OwnershipRule> rules;
    for (const auto& kv : f.value) {
        const YAML::Node key = kv.first, value = kv.second;
        MM_ASSIGN_OR_RETURN(OwnershipRule r, parse_rule(&key, value, ctx));
        for (const auto& prev : rules) {
            std::pair<int, int> a, b;
            if (ranges_overlap(r.layers, prev.layers, &a, &b)) {
                size_t i = std::find(r.layers.begin(), r.layers.end(), a) - r.layers.begin();
                return err(r.layer_range_locs[i], ctx,
                           str_printf("in '%s', layers \"%s\" overlap layers \"%s\" (line %d)", f.key.c_str(),
                                      clip(r.layers_text).c_str(), clip(prev.layers_text).c_str(),
                                      prev.layers_loc.line));
            }
        }
        rules.push_back(std::move(r));
    }
    return rules;
}

Status Parser::parse_worker(const YAML::Node& n, size_t index) {
    std::string ctx = str_printf("worker #%zu: ", index + 1);
    if (!n.IsMap()) return err(n, ctx, std::string("a worker must be a map with 'name', 'address', ...; got ") + node_kind(n));
    WorkerConfig w;
    w.loc = loc(n);
    // The name first, so that every other message can say which worker.
    for (const auto& kv : n) {
        if (kv.first.IsScalar() && kv.first.Scalar() == "name" && kv.second.IsScalar() && !kv.second.Scalar().empty())
            ctx = "worker '" + clip(kv.second.Scalar()) + "': ";
    }
    MM_ASSIGN_OR_RETURN(std::vector<Field> fs, fields(n, kWorkerKeys, ctx));
    const Field* name = find(fs, "name");
    if (!name) return err(n, ctx, "missing 'name'");
    MM_ASSIGN_OR_RETURN(w.name, scalar(*name, ctx, "a name"));
    w.name_loc = value_loc(*name);
    if (w.name.empty()) return err(w.name_loc, ctx, "'name' is empty");
    for (char c : w.name)
        if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.')
            return err(w.name_loc, ctx, "'name' may only use letters, digits, '.', '_' and '-'");

    if (const Field* x = find(fs, "device")) {
        MM_ASSIGN_OR_RETURN(w.device, device(*x, ctx));
    }
    if (const Field* x = find(fs, "transport")) {
        MM_ASSIGN_OR_RETURN(std::string t, scalar(*x, ctx, "a transport"));
        auto p = std::find(kTransports.begin(), kTransports.end(), t);
        if (p == kTransports.end())
            return err(value_loc(*x), ctx,
                       "unknown transport \"" + clip(t) + "\"" + suggestion(t, kTransports) + " (expected one of " +
                           join(kTransports, ", ") + ")");
        w.transport = static_cast<Transport>(p - kTransports.begin());
    }
    if (const Field* x = find(fs, "address")) {
        MM_ASSIGN_OR_RETURN(w.address, address(*x, ctx));
        w.address_loc = value_loc(*x);
    } else if (w.transport != Transport::kInproc) {
        return err(n, ctx, "missing 'address' (unix:/path, host:port or [v6]:port)");
    }
    if (w.address) {
        const char* need = nullptr;
        if (w.transport == Transport::kUnix && w.address->kind != Address::Kind::kUnix) need = "a unix:/path address";
        if (w.transport == Transport::kTcp && w.address->kind != Address::Kind::kTcp) need = "a host:port address";
        if (need)
            return err(w.address_loc, ctx,
                       str_printf("transport %s needs %s, got %s", transport_name(w.transport), need,
                                  w.address->str().c_str()));
    }
    if ((w.transport == Transport::kNccl || w.transport == Transport::kCudaIpc) && w.device.kind != Device::Kind::kCuda)
        return err(value_loc(*find(fs, "transport")), ctx,
                   str_printf("transport %s needs a cuda:N device, not %s", transport_name(w.transport),
                              w.device.str().c_str()));
    if (is_out_of_band(w.transport) && w.address && !is_local_address(*w.address))
        return err(value_loc(*find(fs, "transport")), ctx,
                   str_printf("transport %s works between processes of one host, but %s is not an address of this "
                              "host (use unix:/path or 127.0.0.1:port, or transport tcp across hosts)",
                              transport_name(w.transport), w.address->str().c_str()));
    if (const Field* x = find(fs, "transport")) w.transport_loc = value_loc(*x);
    if (const Field* x = find(fs, "threads")) {
        MM_ASSIGN_OR_RETURN(w.threads, integer(*x, ctx, 0, 4096));
    }
    if (const Field* x = find(fs, "cache")) {
        w.cache_loc = loc(x->key_node);
        if (!x->value.IsMap())
            return err(value_loc(*x), ctx,
                       std::string("'cache' must be a map such as {device: 6GiB, host: 24GiB}, got ") +
                           node_kind(x->value));
        MM_ASSIGN_OR_RETURN(std::vector<Field> cs, fields(x->value, kCacheKeys, ctx + "cache: "));
        if (const Field* c = find(cs, "device")) {
            MM_ASSIGN_OR_RETURN(w.cache_device_bytes, size(*c, ctx + "cache: "));
        }
        if (const Field* c = find(cs, "host")) {
            MM_ASSIGN_OR_RETURN(w.cache_host_bytes, size(*c, ctx + "cache: "));
        }
        auto one_of = [&](const Field& c, const std::vector<std::string>& allowed, std::string* out) -> Status {
            MM_ASSIGN_OR_RETURN(std::string v, scalar(c, ctx + "cache: ", "a name"));
            if (std::find(allowed.begin(), allowed.end(), v) == allowed.end())
                return err(value_loc(c), ctx + "cache: ",
                           "unknown " + c.key + " \"" + clip(v) + "\"" + suggestion(v, allowed) + " (expected one of " +
                               join(allowed, ", ") + ")");
            *out = v;
            return Status();
        };
        if (const Field* c = find(cs, "policy")) MM_RETURN_IF_ERROR(one_of(*c, kCachePolicies, &w.cache_policy));
        if (const Field* c = find(cs, "prefetch")) MM_RETURN_IF_ERROR(one_of(*c, kPrefetchModes, &w.cache_prefetch));
        if (const Field* c = find(cs, "storage")) MM_RETURN_IF_ERROR(one_of(*c, kStorageModes, &w.cache_storage));
        const Field* prof = find(cs, "profile");
        if (prof) {
            MM_ASSIGN_OR_RETURN(std::string p, scalar(*prof, ctx + "cache: ", "a file path"));
            if (p.empty()) return err(value_loc(*prof), ctx + "cache: ", "'profile' is empty");
            w.cache_profile = path(p);
        }
        if (w.cache_policy == "static" && !prof)
            return err(value_loc(*x), ctx + "cache: ",
                       "policy static needs 'profile' (an expert profile written by moemesh profile)");
        if (prof && w.cache_policy != "static")
            return err(loc(prof->key_node), ctx + "cache: ", "'profile' is only read by policy static");
        w.cache_enabled = true;
    }
    if (const Field* x = find(fs, "tls")) {
        if (!x->value.IsMap())
            return err(value_loc(*x), ctx,
                       std::string("'tls' must be a map such as {ca: ca.pem, cert: w.pem, key: w.key}, got ") +
                           node_kind(x->value));
        MM_ASSIGN_OR_RETURN(std::vector<Field> ts, fields(x->value, kTlsKeys, ctx + "tls: "));
        for (const auto& t : ts) {
            MM_ASSIGN_OR_RETURN(std::string p, scalar(t, ctx + "tls: ", "a file path"));
            if (p.empty()) return err(value_loc(t), ctx + "tls: ", "'" + t.key + "' is empty");
            (t.key == "ca" ? w.tls.ca : t.key == "cert" ? w.tls.cert : w.tls.key) = path(p);
        }
        if (w.tls.cert.empty() != w.tls.key.empty())
            return err(value_loc(*x), ctx + "tls: ", "'cert' and 'key' go together");
        if (!w.tls.enabled()) return err(value_loc(*x), ctx + "tls: ", "needs 'ca' and/or 'cert' + 'key'");
    }

    // One host: nothing to protect the data from that TLS would (and the bulk bypasses gRPC).
    if (is_out_of_band(w.transport) && w.tls.enabled())
        return err(value_loc(*find(fs, "transport")), ctx,
                   str_printf("transport %s is for one host and does not take 'tls' (the data bypasses gRPC)",
                              transport_name(w.transport)));

    const Field* experts = find(fs, "experts");
    const Field* layers = find(fs, "layers");
    if (experts && layers)
        return err(loc(layers->key_node), ctx,
                   "give either 'experts' (the same experts in every layer) or 'layers' (per layer range), not both");
    if (!experts && !layers) return err(n, ctx, "missing 'experts' or 'layers': which experts does it serve?");
    if (experts) {
        if (experts->value.IsNull()) return err(loc(experts->key_node), ctx, "'experts' is empty");
        MM_ASSIGN_OR_RETURN(OwnershipRule r, parse_rule(nullptr, experts->value, ctx));
        w.owns.push_back(std::move(r));
    } else {
        MM_ASSIGN_OR_RETURN(w.owns, parse_layer_map(*layers, ctx));
    }
    if (const Field* x = find(fs, "replicas")) {
        MM_ASSIGN_OR_RETURN(w.replicas, parse_layer_map(*x, ctx));
    }
    cfg_.workers.push_back(std::move(w));
    return Status();
}

// Ids of one rule against the model.
Status check_rule(const ClusterConfig& cfg, const std::string& ctx, const OwnershipRule& r, int n_layer, int n_expert,
                  const char* what) {
    for (size_t i = 0; i < r.layers.size(); ++i) {
        auto [lo, hi] = r.layers[i];
        if (hi >= n_layer)
            return Status::error(cfg.where(r.layer_range_locs[i]) + ctx +
                                 str_printf("%s%s \"%s\" exceeds the model's %d layers (0-%d)", what,
                                            lo == hi ? "layer" : "layer range", range_text(r.layers[i]).c_str(),
                                            n_layer, n_layer - 1));
    }
    for (size_t i = 0; i < r.experts.size(); ++i) {
        auto [lo, hi] = r.experts[i];
        if (hi >= n_expert)
            return Status::error(cfg.where(r.expert_range_locs[i]) + ctx +
                                 str_printf("%s%s \"%s\" exceeds the model's %d experts (0-%d)", what,
                                            lo == hi ? "expert" : "expert range", range_text(r.experts[i]).c_str(),
                                            n_expert, n_expert - 1));
    }
    return Status();
}

template <class F>
void for_each_pair(const OwnershipRule& r, int n_layer, F&& f) {
    auto each_layer = [&](int l) {
        for (auto [elo, ehi] : r.experts)
            for (int e = elo; e <= ehi; ++e) f(l, e);
    };
    if (r.all_layers) {
        for (int l = 0; l < n_layer; ++l) each_layer(l);
    } else {
        for (auto [llo, lhi] : r.layers)
            for (int l = llo; l <= lhi; ++l) each_layer(l);
    }
}

Status check_dims(const ClusterConfig& cfg, const ModelConfig& model) {
    if (model.n_layer <= 0 || model.n_expert <= 0)
        return MM_ERROR("%s: the model has no routed experts (%lld layers, %lld experts)", cfg.source.c_str(),
                        static_cast<long long>(model.n_layer), static_cast<long long>(model.n_expert));
    if (model.n_layer > (1 << 20) || model.n_expert > (1 << 20) || model.n_layer * model.n_expert > (1ll << 28))
        return MM_ERROR("%s: model dimensions too large for placement (%lld layers x %lld experts)",
                        cfg.source.c_str(), static_cast<long long>(model.n_layer),
                        static_cast<long long>(model.n_expert));
    return Status();
}

}  // namespace

// ---- small parsers ----

StatusOr<uint64_t> parse_size(const std::string& text) {
    std::string s = trim(text);
    size_t i = 0;
    while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
    std::string num = s.substr(0, i);
    std::string unit = lower(trim(s.substr(i)));
    if (num.empty() || std::count(num.begin(), num.end(), '.') > 1 || num == "." || num.size() > 30)
        return MM_ERROR("bad size \"%s\" (expected bytes or a number with a unit, e.g. 12GiB)", clip(text).c_str());
    struct Unit {
        const char* name;
        long double mult;
    };
    static const Unit kUnits[] = {{"", 1},      {"b", 1},       {"k", 1e3},    {"kb", 1e3},  {"m", 1e6},
                                  {"mb", 1e6},  {"g", 1e9},     {"gb", 1e9},   {"t", 1e12},  {"tb", 1e12},
                                  {"kib", 1024.0L}, {"mib", 1048576.0L}, {"gib", 1073741824.0L},
                                  {"tib", 1099511627776.0L}};
    const Unit* u = nullptr;
    for (const auto& x : kUnits)
        if (unit == x.name) u = &x;
    if (!u)
        return MM_ERROR("bad size \"%s\": unknown unit \"%s\" (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)",
                        clip(text).c_str(), clip(trim(s.substr(i))).c_str());
    long double v = std::strtold(num.c_str(), nullptr) * u->mult;
    if (!(v < 18446744073709551616.0L)) return MM_ERROR("bad size \"%s\": too large", clip(text).c_str());
    if (num.find('.') != std::string::npos && u->mult == 1)
        return MM_ERROR("bad size \"%s\": a byte count must be a whole number", clip(text).c_str());
    return static_cast<uint64_t>(v);
}

StatusOr<IdRanges> parse_ranges(const std::string& text, int limit) {
    MM_ASSIGN_OR_RETURN(std::vector<RangeItem> items, parse_range_items(text));
    IdRanges out;
    for (const auto& it : items) {
        if (limit >= 0 && it.hi >= limit)
            return MM_ERROR("id %d in \"%s\" is out of range (0-%d)", it.hi, clip(text).c_str(), limit - 1);
        out.push_back({it.lo, it.hi});
    }
    return out;
}

std::string format_ranges(const std::vector<int>& ids) {
    std::string s;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (!s.empty()) s += ",";
        s += range_text({ids[i], ids[j]});
        i = j + 1;
    }
    return s;
}

StatusOr<Address> parse_address(const std::string& text) {
    Address a;
    const std::string t = text;
    if (t.rfind("unix:", 0) == 0) {
        a.kind = Address::Kind::kUnix;
        a.path = t.substr(5);
        if (a.path.empty()) return MM_ERROR("bad address \"%s\": empty socket path", clip(t).c_str());
        if (a.path.size() > kMaxUnixPath)
            return MM_ERROR("bad address \"%s\": socket path longer than %zu bytes", clip(t).c_str(), kMaxUnixPath);
        if (a.path.find('\0') != std::string::npos) return MM_ERROR("bad address: NUL byte in socket path");
        return a;
    }
    std::string port;
    if (!t.empty() && t[0] == '[') {
        size_t close = t.find(']');
        if (close == std::string::npos) return MM_ERROR("bad address \"%s\": missing ']'", clip(t).c_str());
        a.host = t.substr(1, close - 1);
        if (close + 1 >= t.size() || t[close + 1] != ':')
            return MM_ERROR("bad address \"%s\": expected [v6]:port", clip(t).c_str());
        port = t.substr(close + 2);
        if (a.host.empty()) return MM_ERROR("bad address \"%s\": empty host", clip(t).c_str());
        for (char c : a.host)
            if (!std::isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.' && c != '%')
                return MM_ERROR("bad address \"%s\": \"%s\" is not an IPv6 address", clip(t).c_str(),
                                clip(a.host).c_str());
    } else {
        size_t colon = t.rfind(':');
        if (colon == std::string::npos)
            return MM_ERROR("bad address \"%s\": expected unix:/path, host:port or [v6]:port", clip(t).c_str());
        a.host = t.substr(0, colon);
        port = t.substr(colon + 1);
        if (a.host.empty()) return MM_ERROR("bad address \"%s\": empty host", clip(t).c_str());
        if (a.host.find(':') != std::string::npos)
            return MM_ERROR("bad address \"%s\": write IPv6 addresses in brackets, e.g. [::1]:7100", clip(t).c_str());
        for (char c : a.host)
            if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_')
                return MM_ERROR("bad address \"%s\": invalid character in host \"%s\"", clip(t).c_str(),
                                clip(a.host).c_str());
        if (a.host.size() > 253) return MM_ERROR("bad address: host name longer than 253 characters");
        a.host = lower(a.host);
    }
    if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
        return MM_ERROR("bad address \"%s\": port \"%s\" is not a number", clip(t).c_str(), clip(port).c_str());
    a.port = std::stoi(port);
    if (a.port < 1 || a.port > 65535)
        return MM_ERROR("bad address \"%s\": port %d is out of range (1-65535)", clip(t).c_str(), a.port);
    return a;
}

std::string Address::str() const {
    if (kind == Kind::kUnix) return "unix:" + path;
    if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
    return host + ":" + std::to_string(port);
}

bool Address::operator==(const Address& o) const {
    if (kind != o.kind) return false;
    return kind == Kind::kUnix ? path == o.path : (lower(host) == lower(o.host) && port == o.port);
}

StatusOr<Device> parse_device(const std::string& text) {
    Device d;
    if (text == "cpu") return d;
    if (text.rfind("cuda:", 0) == 0 && text.size() > 5 && text.size() <= 8) {
        std::string n = text.substr(5);
        if (std::all_of(n.begin(), n.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); })) {
            d.kind = Device::Kind::kCuda;
            d.index = std::stoi(n);
            return d;
        }
    }
    std::string hint = (text == "cuda" || text == "gpu") ? " (did you mean 'cuda:0'?)" : "";
    return MM_ERROR("invalid device \"%s\"%s (expected cpu or cuda:N)", clip(text).c_str(), hint.c_str());
}

std::string Device::str() const { return kind == Kind::kCpu ? "cpu" : "cuda:" + std::to_string(index); }

const char* transport_name(Transport t) { return kTransports[static_cast<size_t>(t)].c_str(); }

bool is_out_of_band(Transport t) {
    return t == Transport::kShm || t == Transport::kCudaIpc || t == Transport::kNccl;
}

bool is_local_address(const Address& a) {
    if (a.kind == Address::Kind::kUnix) return true;
    if (a.host == "localhost" || a.host == "::1") return true;
    in_addr v4{};
    return inet_pton(AF_INET, a.host.c_str(), &v4) == 1 && (ntohl(v4.s_addr) >> 24) == 127;
}

Transport resolve_transport(const ClusterConfig& cfg, const WorkerConfig& w, std::string* why) {
    auto say = [&](Transport t, const std::string& reason) {
        if (why) *why = reason;
        return t;
    };
    if (w.transport != Transport::kAuto) return say(w.transport, "as configured");
    if (!w.address) return say(Transport::kInproc, "no address: runs in the coordinator's process");
    if (!is_local_address(*w.address))
        return say(w.address->kind == Address::Kind::kUnix ? Transport::kUnix : Transport::kTcp,
                   "another host: gRPC with the activations in the messages");
    const Device& c = cfg.coordinator.device;
    if (c.kind != Device::Kind::kCuda || w.device.kind != Device::Kind::kCuda)
        return say(Transport::kShm, "this host, a CPU side: shared memory");
    if (c.index == w.device.index)
        return say(Transport::kCudaIpc, str_printf("this host, the coordinator's GPU %s: CUDA IPC", c.str().c_str()));
    return say(Transport::kNccl, str_printf("this host, GPUs %s and %s: NCCL", c.str().c_str(), w.device.str().c_str()));
}
const char* activation_format_name(ActivationFormat f) { return f == ActivationFormat::kF32 ? "f32" : "bf16"; }

std::string format_bytes(uint64_t b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = static_cast<double>(b);
    int u = 0;
    while (v >= 1024 && u < 6) {
        v /= 1024;
        ++u;
    }
    return u ? str_printf("%.2f %s", v, units[u]) : str_printf("%llu B", static_cast<unsigned long long>(b));
}

std::string ClusterConfig::where(SourceLoc loc) const {
    return loc.line > 0 ? str_printf("%s:%d:%d: ", source.c_str(), loc.line, loc.col) : source + ": ";
}

bool OwnershipMap::serves(int worker, int layer, int expert) const {
    if (layer < 0 || layer >= n_layer || expert < 0 || expert >= n_expert) return false;
    const auto& s = serving(layer, expert);
    return std::find(s.begin(), s.end(), worker) != s.end();
}

// ---- loading ----

StatusOr<ClusterConfig> parse_cluster_config(const std::string& yaml_text, const std::string& name_for_errors,
                                             const std::string& base_dir) {
    if (yaml_text.size() > kMaxYamlBytes)
        return MM_ERROR("%s: file too large (%zu bytes; a cluster file is at most %zu)", name_for_errors.c_str(),
                        yaml_text.size(), kMaxYamlBytes);
    MM_RETURN_IF_ERROR(check_nesting(yaml_text, name_for_errors));
    YAML::Node root;
    try {
        root = YAML::Load(yaml_text);
    } catch (const YAML::Exception& e) {
        if (e.mark.line >= 0)
            return MM_ERROR("%s:%d:%d: %s", name_for_errors.c_str(), e.mark.line + 1, e.mark.column + 1, e.msg.c_str());
        return MM_ERROR("%s: %s", name_for_errors.c_str(), e.msg.c_str());
    } catch (const std::exception& e) {
        return MM_ERROR("%s: %s", name_for_errors.c_str(), e.what());
    }
    try {
        Parser p(yaml_text, name_for_errors, base_dir);
        return p.run(root);
    } catch (const std::exception& e) {  // yaml-cpp's accessors throw on misuse; report rather than crash
        return MM_ERROR("%s: %s", name_for_errors.c_str(), e.what());
    }
}

StatusOr<ClusterConfig> load_cluster_config(const std::string& yaml_path) {
    std::ifstream in(yaml_path, std::ios::binary);
    if (!in) return MM_ERROR("%s: cannot open: %s", yaml_path.c_str(), std::strerror(errno));
    std::string text;
    char buf[65536];
    while (in.read(buf, sizeof buf) || in.gcount() > 0) {
        text.append(buf, static_cast<size_t>(in.gcount()));
        if (text.size() > kMaxYamlBytes) break;
    }
    if (in.bad()) return MM_ERROR("%s: read error", yaml_path.c_str());
    std::string dir = std::filesystem::path(yaml_path).parent_path().string();
    return parse_cluster_config(text, yaml_path, dir.empty() ? "." : dir);
}

// ---- against the model ----

Status validate(const ClusterConfig& cfg, const ModelConfig& model) {
    MM_RETURN_IF_ERROR(check_dims(cfg, model));
    const int L = static_cast<int>(model.n_layer), E = static_cast<int>(model.n_expert);
    std::vector<uint8_t> owned(size_t(L) * E, 0);
    for (const auto& w : cfg.workers) {
        const std::string ctx = "worker '" + w.name + "': ";
        std::vector<uint8_t> mine(size_t(L) * E, 0);
        for (const auto& r : w.owns) {
            MM_RETURN_IF_ERROR(check_rule(cfg, ctx, r, L, E, ""));
            for_each_pair(r, L, [&](int l, int e) { owned[size_t(l) * E + e] = mine[size_t(l) * E + e] = 1; });
        }
        for (const auto& r : w.replicas) {
            MM_RETURN_IF_ERROR(check_rule(cfg, ctx, r, L, E, "replica "));
            Status st;
            for_each_pair(r, L, [&](int l, int e) {
                if (st.ok() && mine[size_t(l) * E + e])
                    st = Status::error(cfg.where(r.experts_loc) + ctx +
                                       str_printf("replica of layer %d expert %d, which this worker already owns", l, e));
            });
            MM_RETURN_IF_ERROR(st);
        }
    }
    // Coverage, compactly: consecutive layers missing the same experts are one group.
    std::vector<std::string> groups;
    size_t total_groups = 0;
    int group_start = -1;
    std::string group_missing;
    auto flush = [&](int end_layer) {
        if (group_start < 0 || group_missing.empty()) return;
        ++total_groups;
        if (groups.size() < 8)
            groups.push_back((group_start == end_layer ? str_printf("layer %d", group_start)
                                                       : str_printf("layers %d-%d", group_start, end_layer)) +
                             " experts " + group_missing);
    };
    for (int l = 0; l < L; ++l) {
        std::vector<int> missing;
        for (int e = 0; e < E; ++e)
            if (!owned[size_t(l) * E + e]) missing.push_back(e);
        std::string m = format_ranges(missing);
        if (m != group_missing || group_start < 0) {
            flush(l - 1);
            group_start = l;
            group_missing = m;
        }
    }
    flush(L - 1);
    if (total_groups) {
        std::string more = total_groups > groups.size() ? str_printf("; and %zu more", total_groups - groups.size()) : "";
        return Status::error(cfg.where(cfg.workers_loc) + "no worker owns " + join(groups, "; ") + more +
                             " (replicas do not count as owners)");
    }
    return Status();
}

StatusOr<OwnershipMap> resolve_placement(const ClusterConfig& cfg, const ModelConfig& model, const GgufFile* file) {
    MM_RETURN_IF_ERROR(validate(cfg, model));
    OwnershipMap m;
    m.n_layer = static_cast<int>(model.n_layer);
    m.n_expert = static_cast<int>(model.n_expert);
    const size_t n_pairs = size_t(m.n_layer) * m.n_expert;
    m.servers.assign(n_pairs, {});
    m.num_primary.assign(n_pairs, 0);
    m.expert_bytes.assign(m.n_layer, 0);
    m.workers.resize(cfg.workers.size());

    if (file) {
        m.bytes_known = true;
        for (int l = 0; l < m.n_layer; ++l) {
            for (Tensor t : {Tensor::kFfnGateExps, Tensor::kFfnUpExps, Tensor::kFfnDownExps, Tensor::kFfnGateUpExps}) {
                const GgufTensor* g = file->tensor(tensor_name(t, l));
                if (!g) continue;
                if (g->n_dims != 3 || g->ne[2] != model.n_expert)
                    return MM_ERROR("%s: tensor '%s' has shape %s, expected %lld experts in its last dimension",
                                    file->path().c_str(), g->name.c_str(), g->shape_str().c_str(),
                                    static_cast<long long>(model.n_expert));
                m.expert_bytes[l] += g->nbytes / static_cast<size_t>(model.n_expert);
            }
        }
    }

    for (size_t wi = 0; wi < cfg.workers.size(); ++wi) {
        for (const auto& r : cfg.workers[wi].owns)
            for_each_pair(r, m.n_layer, [&](int l, int e) {
                auto& s = m.servers[size_t(l) * m.n_expert + e];
                s.insert(s.begin() + m.num_primary[size_t(l) * m.n_expert + e]++, static_cast<int>(wi));
                m.workers[wi].primary.push_back({l, e});
            });
    }
    for (size_t wi = 0; wi < cfg.workers.size(); ++wi) {
        for (const auto& r : cfg.workers[wi].replicas)
            for_each_pair(r, m.n_layer, [&](int l, int e) {
                m.servers[size_t(l) * m.n_expert + e].push_back(static_cast<int>(wi));
                m.workers[wi].replicas.push_back({l, e});
            });
    }
    for (size_t wi = 0; wi < cfg.workers.size(); ++wi) {
        const WorkerConfig& w = cfg.workers[wi];
        WorkerShard& s = m.workers[wi];
        std::sort(s.primary.begin(), s.primary.end());
        std::sort(s.replicas.begin(), s.replicas.end());
        if (!m.bytes_known) continue;
        int max_layer = -1;
        for (const auto* v : {&s.primary, &s.replicas})
            for (auto [l, e] : *v) {
                s.bytes += m.expert_bytes[l];
                if (m.expert_bytes[l] > s.max_expert_bytes) {
                    s.max_expert_bytes = m.expert_bytes[l];
                    max_layer = l;
                }
            }
        if (w.cache_device_bytes && w.cache_host_bytes) {
            uint64_t budget = w.cache_device_bytes + w.cache_host_bytes;
            if (budget < w.cache_device_bytes) budget = UINT64_MAX;
            if (budget < s.max_expert_bytes)
                return Status::error(cfg.where(w.cache_loc) + "worker '" + w.name + "': " +
                                     str_printf("cache budgets (device %s + host %s = %s) cannot hold one expert of "
                                                "its shard (%s, layer %d)",
                                                format_bytes(w.cache_device_bytes).c_str(),
                                                format_bytes(w.cache_host_bytes).c_str(), format_bytes(budget).c_str(),
                                                format_bytes(s.max_expert_bytes).c_str(), max_layer));
            s.streams = budget < s.bytes;
        }
        for (auto [b, what] : {std::pair<uint64_t, const char*>{w.cache_device_bytes, "device"}, {w.cache_host_bytes, "host"}}) {
            if (w.cache_enabled && b && b < s.max_expert_bytes)
                return Status::error(cfg.where(w.cache_loc) + "worker '" + w.name + "': " +
                                     str_printf("cache.%s = %s cannot hold one expert of its shard (%s, layer %d)", what,
                                                format_bytes(b).c_str(), format_bytes(s.max_expert_bytes).c_str(),
                                                max_layer));
        }
        if (w.cache_enabled && w.cache_device_bytes && w.cache_device_bytes < s.bytes) s.streams = true;
    }
    return m;
}

std::string placement_summary(const ClusterConfig& cfg, const OwnershipMap& m) {
    std::string out;
    const size_t n_pairs = size_t(m.n_layer) * m.n_expert;
    out += str_printf("cluster %s: %d layers x %d experts = %zu (layer, expert) pairs, %zu workers, activations %s\n",
                      cfg.source.c_str(), m.n_layer, m.n_expert, n_pairs, cfg.workers.size(),
                      activation_format_name(cfg.activations));
    if (!cfg.model_path.empty()) out += "model: " + cfg.model_path + "\n";
    if (m.bytes_known) {
        uint64_t total = 0;
        for (uint64_t b : m.expert_bytes) total += b * m.n_expert;
        out += "routed-expert bytes: " + format_bytes(total) + "\n";
    }
    const CoordinatorConfig& c = cfg.coordinator;
    out += str_printf("coordinator: device %s, http %s, control %s, timeout %d ms\n", c.device.str().c_str(),
                      c.http ? c.http->str().c_str() : kDefaultHttp, c.control ? c.control->str().c_str() : "(default)",
                      c.timeout_ms);
    for (size_t wi = 0; wi < cfg.workers.size(); ++wi) {
        const WorkerConfig& w = cfg.workers[wi];
        const WorkerShard& s = m.workers[wi];
        const Transport t = resolve_transport(cfg, w);
        out += str_printf("worker '%s': %s, device %s, transport %s%s%s%s\n", w.name.c_str(),
                          w.address ? w.address->str().c_str() : "(in-process)", w.device.str().c_str(),
                          transport_name(w.transport),
                          t != w.transport ? (std::string(" (") + transport_name(t) + ")").c_str() : "", w.threads ? str_printf(", %d threads", w.threads).c_str() : "",
                          w.tls.enabled() ? ", tls" : "");
        std::vector<int> layers;
        for (auto [l, e] : s.primary)
            if (layers.empty() || layers.back() != l) layers.push_back(l);
        out += str_printf("  owns %zu pairs (%.1f%% of all experts), layers %s", s.primary.size(),
                          n_pairs ? 100.0 * s.primary.size() / n_pairs : 0.0,
                          layers.empty() ? "none" : format_ranges(layers).c_str());
        out += "\n";
        if (!s.replicas.empty()) out += str_printf("  replicas: %zu pairs\n", s.replicas.size());
        if (m.bytes_known)
            out += "  shard bytes: " + format_bytes(s.bytes) + (s.replicas.empty() ? "" : " (with replicas)") + "\n";
        auto budget = [](uint64_t b) { return b ? format_bytes(b) : std::string("unlimited"); };
        out += "  cache budget: device " + budget(w.cache_device_bytes) + ", host " +
               (w.cache_enabled && !w.cache_host_bytes ? std::string("none") : budget(w.cache_host_bytes));
        if (w.cache_enabled) {
            out += ", policy " + w.cache_policy + ", prefetch " + w.cache_prefetch;
            if (w.cache_storage != "auto") out += ", storage " + w.cache_storage;
        }
        if (s.streams) out += " (smaller than the shard: experts stream from the model file)";
        out += "\n";
    }
    size_t replicated = 0, single = 0;
    for (size_t i = 0; i < n_pairs; ++i) (m.servers[i].size() > 1 ? replicated : single)++;
    out += str_printf("served by more than one worker: %zu of %zu pairs\n", replicated, n_pairs);
    return out;
}

}  // namespace moemesh
