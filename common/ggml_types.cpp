#include "common/ggml_types.h"

#include <strings.h>

namespace moemesh {

namespace {
// Block sizes and bytes per block as ggml defines them (ggml.c type_traits).
const GgmlTypeInfo kInfos[static_cast<int>(GgmlType::kCount)] = {
    /*0  F32    */ {"f32", 1, 4, true},
    /*1  F16    */ {"f16", 1, 2, true},
    /*2  Q4_0   */ {"q4_0", 32, 18, true},
    /*3  Q4_1   */ {"q4_1", 32, 20, true},
    /*4         */ {nullptr, 0, 0, false},
    /*5         */ {nullptr, 0, 0, false},
    /*6  Q5_0   */ {"q5_0", 32, 22, true},
    /*7  Q5_1   */ {"q5_1", 32, 24, true},
    /*8  Q8_0   */ {"q8_0", 32, 34, true},
    /*9  Q8_1   */ {"q8_1", 32, 36, false},
    /*10 Q2_K   */ {"q2_k", 256, 84, true},
    /*11 Q3_K   */ {"q3_k", 256, 110, true},
    /*12 Q4_K   */ {"q4_k", 256, 144, true},
    /*13 Q5_K   */ {"q5_k", 256, 176, true},
    /*14 Q6_K   */ {"q6_k", 256, 210, true},
    /*15 Q8_K   */ {"q8_k", 256, 292, false},
    /*16 IQ2_XXS*/ {"iq2_xxs", 256, 66, true},
    /*17 IQ2_XS */ {"iq2_xs", 256, 74, true},
    /*18 IQ3_XXS*/ {"iq3_xxs", 256, 98, true},
    /*19 IQ1_S  */ {"iq1_s", 256, 50, true},
    /*20 IQ4_NL */ {"iq4_nl", 32, 18, true},
    /*21 IQ3_S  */ {"iq3_s", 256, 110, true},
    /*22 IQ2_S  */ {"iq2_s", 256, 82, true},
    /*23 IQ4_XS */ {"iq4_xs", 256, 136, true},
    /*24 I8     */ {"i8", 1, 1, false},
    /*25 I16    */ {"i16", 1, 2, false},
    /*26 I32    */ {"i32", 1, 4, false},
    /*27 I64    */ {"i64", 1, 8, false},
    /*28 F64    */ {"f64", 1, 8, false},
    /*29 IQ1_M  */ {"iq1_m", 256, 56, true},
    /*30 BF16   */ {"bf16", 1, 2, true},
    /*31        */ {nullptr, 0, 0, false},
    /*32        */ {nullptr, 0, 0, false},
    /*33        */ {nullptr, 0, 0, false},
    /*34 TQ1_0  */ {"tq1_0", 256, 54, false},
    /*35 TQ2_0  */ {"tq2_0", 256, 66, false},
    /*36        */ {nullptr, 0, 0, false},
    /*37        */ {nullptr, 0, 0, false},
    /*38        */ {nullptr, 0, 0, false},
    /*39 MXFP4  */ {"mxfp4", 32, 17, true},
};
const GgmlTypeInfo kUnknown = {nullptr, 0, 0, false};
}  // namespace

const GgmlTypeInfo& ggml_type_info(GgmlType t) {
    auto i = static_cast<uint32_t>(t);
    if (i >= static_cast<uint32_t>(GgmlType::kCount)) return kUnknown;
    return kInfos[i];
}

bool ggml_type_known(uint32_t id) { return id < static_cast<uint32_t>(GgmlType::kCount) && kInfos[id].name; }

const char* ggml_type_name(GgmlType t) {
    const char* n = ggml_type_info(t).name;
    return n ? n : "unknown";
}

bool ggml_type_from_name(const std::string& name, GgmlType* out) {
    for (uint32_t i = 0; i < static_cast<uint32_t>(GgmlType::kCount); ++i) {
        if (kInfos[i].name && strcasecmp(kInfos[i].name, name.c_str()) == 0) {
            *out = static_cast<GgmlType>(i);
            return true;
        }
    }
    return false;
}

size_t ggml_row_bytes(GgmlType t, int64_t n) {
    const auto& info = ggml_type_info(t);
    if (info.block_size == 0) return 0;
    return static_cast<size_t>(n / info.block_size) * info.type_size;
}

}  // namespace moemesh
