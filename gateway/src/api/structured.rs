//! Structured-output request fields: OpenAI's `response_format` and
//! vLLM's `guided_*` and `structured_outputs`, made into one grammar.

use super::*;

/// `structured_outputs`, as vLLM takes it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

/// A JSON schema given as an object or as JSON text.
fn schema_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str::<Value>(s)
            .map(|_| s.clone())
            .map_err(|e| ApiError::bad(param, format!("the schema is not JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        _ => Err(ApiError::bad(param, "a JSON schema is an object")),
    }
}

/// The request's grammar, from OpenAI's `response_format` or vLLM's
/// extensions (at most one of them), and the field it came from.
pub fn grammar_of(
    s: &Sampling,
    response_format: Option<&Value>,
) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let mut found: Vec<(Grammar, &'static str)> = Vec::new();
    if let Some(f) = response_format.filter(|f| !f.is_null()) {
        let p = "response_format";
        match f["type"].as_str() {
            Some("text") => {}
            Some("json_object") => {
                found.push((Grammar::JsonSchema(r#"{"type":"object"}"#.into()), p))
            }
            Some("json_schema") => {
                let schema = &f["json_schema"]["schema"];
                if schema.is_null() {
                    return Err(ApiError::bad(
                        p,
                        "response_format json_schema needs json_schema.schema",
                    ));
                }
                found.push((Grammar::JsonSchema(schema_text(schema, p)?), p));
            }
            other => {
                return Err(ApiError::bad(
                    p,
                    format!(
                        "response_format type {} is not one of text, json_object, json_schema",
                        other.map_or("(missing)".to_string(), |t| format!("'{t}'"))
                    ),
                ))
            }
        }
    }
    let choice = |c: &[String], p: &'static str| -> Result<(Grammar, &'static str), ApiError> {
        if c.is_empty() || c.iter().any(String::is_empty) {
            return Err(ApiError::bad(
                p,
                "choices must be non-empty strings, at least one",
            ));
        }
        Ok((Grammar::choice(c), p))
    };
    if let Some(v) = &s.guided_json {
        found.push((
            Grammar::JsonSchema(schema_text(v, "guided_json")?),
            "guided_json",
        ));
    }
    if let Some(r) = &s.guided_regex {
        found.push((Grammar::Regex(r.clone()), "guided_regex"));
    }
    if let Some(c) = &s.guided_choice {
        found.push(choice(c, "guided_choice")?);
    }
    if let Some(g) = &s.guided_grammar {
        found.push((Grammar::Lark(g.clone()), "guided_grammar"));
    }
    if let Some(o) = &s.structured_outputs {
        let p = "structured_outputs";
        if let Some(v) = &o.json {
            found.push((Grammar::JsonSchema(schema_text(v, p)?), p));
        }
        if let Some(r) = &o.regex {
            found.push((Grammar::Regex(r.clone()), p));
        }
        if let Some(c) = &o.choice {
            found.push(choice(c, p)?);
        }
        if let Some(g) = &o.grammar {
            found.push((Grammar::Lark(g.clone()), p));
        }
        if o.json_object == Some(true) {
            found.push((Grammar::JsonSchema(r#"{"type":"object"}"#.into()), p));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::bad(
            found[1].1,
            "give one structured-output constraint, not several",
        ));
    }
    Ok(found.pop())
}
