// JSON Schema → GBNF (llama.cpp's grammar text, parsed by common/gbnf.cpp), for constrained
// generation of structured output: response_format {"type": "json_schema"} and tool arguments.
//
// The grammar is strict: every text it accepts is JSON that the schema accepts, except where a
// keyword is listed as not enforced below. It is not complete: some valid texts are refused, which a
// model writing its own output does not need: declared properties come in their declared order
// (extra keys after them), keys and enum / const strings have one spelling (nlohmann::json's), extra
// keys may not use \u escapes where they first differ from every declared key, exponents stop at
// 292 (so that no number overflows a double), whitespace is bounded (below).
//
// Enforced: type (a name or a list), enum and const (any JSON values), properties, required,
// additionalProperties (false / true / a schema; absent means false when properties are given; extra
// keys never spell a declared one), items, prefixItems (and draft-4 items arrays with
// additionalItems), minItems, maxItems, minLength, maxLength (in code points; a \u surrogate pair is
// one), anyOf, oneOf (as anyOf), allOf with one schema, $ref to "#", "#/$defs/...",
// "#/definitions/..." or any JSON pointer into the schema (recursion allowed), nullable (OpenAPI),
// boolean schemas, and minimum / exclusiveMinimum >= 0 (no minus sign). Keywords beside anyOf / oneOf
// / allOf / $ref are joined with each alternative or target (an error where they clash).
//
// Not enforced (the grammar is looser there): pattern, format, minimum / maximum otherwise,
// multipleOf, uniqueItems, contains, min/maxProperties, patternProperties, propertyNames,
// dependencies, not, if/then/else, oneOf's "exactly one", keywords beside enum / const other than
// type. Other keywords (title, description, default, examples, ...) are ignored. maxLength / maxItems
// above 4096 (the engine's largest repetition) count as unbounded; such minimums are errors.
//
// Whitespace between tokens is none, one space, or a newline and up to 20 spaces or tabs, so
// pretty-printed JSON up to indent 20 matches and a model cannot run on in whitespace.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace moemesh {

// Rules for the JSON texts `schema` accepts: a rule named exactly `prefix` matches one such value
// (no surrounding whitespace); helper rules are named `prefix` + "-...", so several schemas can share
// one grammar text under different prefixes. `prefix` is made of [a-zA-Z0-9-]. Errors name the place
// in the schema: "schema.properties.city.type: unknown type 'text'".
StatusOr<std::string> json_schema_to_gbnf(const nlohmann::ordered_json& schema, const std::string& prefix);

// Rules for any JSON value (or, with object_only, any JSON object: response_format
// {"type": "json_object"}), the start rule named `prefix`, helpers `prefix` + "-...".
std::string json_any_gbnf(const std::string& prefix, bool object_only);

}  // namespace moemesh
