#include "common/dynlib.h"

#include <dlfcn.h>

namespace moemesh {

bool dynlib_open(std::initializer_list<const char*> names, DynLib* lib, std::string* tried) {
    tried->clear();
    for (const char* name : names) {
        if (void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL)) {
            lib->handle = h;
            lib->name = name;
            return true;
        }
        // dlerror() names the library in its message ("libnccl.so.2: cannot open shared object file: ...").
        const char* e = dlerror();
        std::string reason = e ? e : "unknown error";
        if (reason.find(name) == std::string::npos) reason = std::string(name) + ": " + reason;
        *tried += (tried->empty() ? "" : "; ") + reason;
    }
    return false;
}

void* dynlib_symbol(const DynLib& lib, const char* symbol, std::string* why) {
    dlerror();
    void* p = dlsym(lib.handle, symbol);
    if (p == nullptr) {
        const char* e = dlerror();
        *why = e ? e : "null symbol";
    }
    return p;
}

}  // namespace moemesh
