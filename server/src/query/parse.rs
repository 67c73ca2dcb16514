//! The filter language (PocketBase's grammar): a lexer and a recursive-descent parser that turn
//! `title ~ "vski" && (views > 10 || @request.auth.id = author)` into an [`Expr`].
//!
//! Knows nothing about collections, SQL or HTTP. Errors name the problem and its position
//! (a character offset into the filter).

use std::fmt;

/// Longest filter accepted, in characters (as PocketBase).
pub const MAX_FILTER_LEN: usize = 3500;
/// Deepest nesting of parentheses accepted.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A field of the record, possibly through relations: `author.name` → `["author", "name"]`.
    Field(Vec<String>),
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    /// `@now`
    Now,
    /// `@request.auth.<field>` → the path after `auth`; `[]` for `@request.auth` itself.
    Auth(Vec<String>),
    /// `@request.body.<field>` (rules of create and update).
    Body(Vec<String>),
    /// `@collection.<name>[:alias].<path>`: the records of another collection (or of this one),
    /// joined by nothing but the comparison. Comparisons naming the same collection and alias
    /// share one joined record; another alias joins it again.
    Collection {
        name: String,
        alias: String,
        path: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    Like,
    NotLike,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    /// `left op right`; `any` for the `?=`-style forms on multi-value operands.
    Cmp {
        left: Operand,
        op: Op,
        any: bool,
        right: Operand,
        at: usize,
    },
}

/// A problem with a filter, and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterError {
    pub message: String,
    pub at: usize,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.message, self.at)
    }
}

fn err<T>(at: usize, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError {
        message: message.into(),
        at,
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    At(String),
    Str(String),
    Num(f64),
    Op(Op, bool),
    And,
    Or,
    LParen,
    RParen,
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, FilterError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        match c {
            '(' => {
                out.push((Tok::LParen, start));
                i += 1;
            }
            ')' => {
                out.push((Tok::RParen, start));
                i += 1;
            }
            '&' if chars.get(i + 1) == Some(&'&') => {
                out.push((Tok::And, start));
                i += 2;
            }
            '|' if chars.get(i + 1) == Some(&'|') => {
                out.push((Tok::Or, start));
                i += 2;
            }
            '\'' | '"' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return err(start, "Unterminated string."),
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some(&e) => s.push(e),
                                None => return err(i, "Unterminated string."),
                            }
                            i += 2;
                        }
                        Some(&q) if q == quote => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push((Tok::Str(s), start));
            }
            '=' | '!' | '>' | '<' | '~' | '?' => {
                let any = c == '?';
                if any {
                    i += 1;
                }
                let (op, len) = match (chars.get(i), chars.get(i + 1)) {
                    (Some('!'), Some('=')) => (Op::Neq, 2),
                    (Some('!'), Some('~')) => (Op::NotLike, 2),
                    (Some('>'), Some('=')) => (Op::Gte, 2),
                    (Some('<'), Some('=')) => (Op::Lte, 2),
                    (Some('='), _) => (Op::Eq, 1),
                    (Some('>'), _) => (Op::Gt, 1),
                    (Some('<'), _) => (Op::Lt, 1),
                    (Some('~'), _) => (Op::Like, 1),
                    _ => return err(start, "Unknown operator."),
                };
                i += len;
                out.push((Tok::Op(op, any), start));
            }
            '@' => {
                i += 1;
                let mut s = String::new();
                while let Some(&ch) = chars.get(i) {
                    if ch.is_ascii_alphanumeric() || ch == '_' || ch == '.' || ch == ':' {
                        s.push(ch);
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push((Tok::At(s), start));
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit() || *d == '.'))
                || c == '.' =>
            {
                let mut s = String::from(c);
                i += 1;
                while let Some(&ch) = chars.get(i) {
                    if ch.is_ascii_digit()
                        || ch == '.'
                        || ch == 'e'
                        || ch == 'E'
                        || ((ch == '-' || ch == '+') && matches!(s.chars().last(), Some('e' | 'E')))
                    {
                        s.push(ch);
                        i += 1;
                    } else {
                        break;
                    }
                }
                match s.parse::<f64>() {
                    Ok(n) if n.is_finite() => out.push((Tok::Num(n), start)),
                    _ => return err(start, format!("'{s}' is not a number.")),
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = String::new();
                while let Some(&ch) = chars.get(i) {
                    if ch.is_ascii_alphanumeric() || ch == '_' || ch == '.' {
                        s.push(ch);
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push((Tok::Ident(s), start));
            }
            other => return err(start, format!("Unexpected character '{}'.", other.escape_default())),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map(|(_, a)| *a).unwrap_or(self.end)
    }

    fn or(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut left = self.and(depth)?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut left = self.unary(depth)?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if self.peek() == Some(&Tok::LParen) {
            if depth >= MAX_DEPTH {
                return err(self.at(), format!("Too deeply nested (more than {MAX_DEPTH} levels)."));
            }
            self.pos += 1;
            let e = self.or(depth + 1)?;
            if self.peek() != Some(&Tok::RParen) {
                return err(self.at(), "Expected ')'.");
            }
            self.pos += 1;
            return Ok(e);
        }
        let at = self.at();
        let left = self.operand()?;
        let (op, any) = match self.peek() {
            Some(Tok::Op(op, any)) => (*op, *any),
            _ => return err(self.at(), "Expected an operator such as =, !=, >, ~ or ?=."),
        };
        self.pos += 1;
        let right = self.operand()?;
        Ok(Expr::Cmp {
            left,
            op,
            any,
            right,
            at,
        })
    }

    fn operand(&mut self) -> Result<Operand, FilterError> {
        let at = self.at();
        let Some((tok, _)) = self.toks.get(self.pos).cloned() else {
            return err(at, "Expected a field or a value.");
        };
        self.pos += 1;
        Ok(match tok {
            Tok::Str(s) => Operand::Str(s),
            Tok::Num(n) => Operand::Num(n),
            Tok::Ident(s) if s == "true" => Operand::Bool(true),
            Tok::Ident(s) if s == "false" => Operand::Bool(false),
            Tok::Ident(s) if s == "null" => Operand::Null,
            Tok::Ident(s) => Operand::Field(path(&s, at)?),
            Tok::At(s) if s == "now" => Operand::Now,
            Tok::At(s) if s.contains(':') && !s.starts_with("collection.") => {
                return err(at, format!("Modifiers such as ':' are not supported in '@{s}'."));
            }
            Tok::At(s) => {
                let parts: Vec<&str> = s.split('.').collect();
                match parts.as_slice() {
                    ["request", "auth", rest @ ..] => Operand::Auth(check_parts(rest, at)?),
                    ["request", "body", rest @ ..] if !rest.is_empty() => Operand::Body(check_parts(rest, at)?),
                    ["collection", target, rest @ ..] if !rest.is_empty() => {
                        let (name, alias) = target.split_once(':').unwrap_or((target, ""));
                        let path = path(&rest.join("."), at)?;
                        if name.is_empty() || name.contains(':') || alias.contains(':') {
                            return err(at, format!("'@{s}' is not a collection reference."));
                        }
                        if rest.iter().any(|p| p.contains(':')) {
                            return err(at, format!("Unexpected ':' in '@{s}'."));
                        }
                        Operand::Collection {
                            name: name.to_string(),
                            alias: alias.to_string(),
                            path,
                        }
                    }
                    _ => return err(at, format!("Unknown variable '@{s}'.")),
                }
            }
            _ => return err(at, "Expected a field or a value."),
        })
    }
}

fn check_parts(parts: &[&str], at: usize) -> Result<Vec<String>, FilterError> {
    if parts.iter().any(|p| p.is_empty()) {
        return err(at, "Empty name in a path.");
    }
    Ok(parts.iter().map(|p| p.to_string()).collect())
}

fn path(s: &str, at: usize) -> Result<Vec<String>, FilterError> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 7 {
        return err(at, "A field path may follow at most 6 relations.");
    }
    check_parts(&parts, at)
}

/// Parses a filter. An empty (or all-space) filter is `None`.
pub fn parse(src: &str) -> Result<Option<Expr>, FilterError> {
    let n = src.chars().count();
    if n > MAX_FILTER_LEN {
        return err(
            MAX_FILTER_LEN,
            format!("The filter is longer than {MAX_FILTER_LEN} characters."),
        );
    }
    if src.contains('\0') {
        return err(src.find('\0').unwrap_or(0), "The filter contains a NUL character.");
    }
    let toks = lex(src)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut p = Parser { toks, pos: 0, end: n };
    let e = p.or(0)?;
    if p.pos < p.toks.len() {
        return err(p.at(), "Unexpected text after the end of the expression.");
    }
    Ok(Some(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(left: Operand, op: Op, any: bool, right: Operand, at: usize) -> Expr {
        Expr::Cmp {
            left,
            op,
            any,
            right,
            at,
        }
    }

    #[test]
    fn parses_operators_operands_and_precedence() {
        let e = parse("a = 1 || b != 'x' && c ?~ \"y\"").unwrap().unwrap();
        let f = |s: &str| Operand::Field(vec![s.into()]);
        assert_eq!(
            e,
            Expr::Or(
                Box::new(cmp(f("a"), Op::Eq, false, Operand::Num(1.0), 0)),
                Box::new(Expr::And(
                    Box::new(cmp(f("b"), Op::Neq, false, Operand::Str("x".into()), 9)),
                    Box::new(cmp(f("c"), Op::Like, true, Operand::Str("y".into()), 21)),
                ))
            )
        );
        for (src, op, any) in [
            ("a>=1", Op::Gte, false),
            ("a<=1", Op::Lte, false),
            ("a<1", Op::Lt, false),
            ("a>1", Op::Gt, false),
            ("a!~1", Op::NotLike, false),
            ("a?!=1", Op::Neq, true),
            ("a?>=1", Op::Gte, true),
            ("a?<1", Op::Lt, true),
        ] {
            match parse(src).unwrap().unwrap() {
                Expr::Cmp { op: o, any: a, .. } => assert_eq!((o, a), (op, any), "{src}"),
                other => panic!("{src}: {other:?}"),
            }
        }
    }

    #[test]
    fn variables_paths_literals_and_escapes() {
        let e =
            parse(r#"author.name = @request.auth.name && x = @now && y = null && z = true && s = 'it\'s' && n = -2.5"#)
                .unwrap();
        let text = format!("{e:?}");
        for needle in [
            "[\"author\", \"name\"]",
            "Auth([\"name\"])",
            "Now",
            "Null",
            "Bool(true)",
            "Str(\"it's\")",
            "Num(-2.5)",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert_eq!(parse("   ").unwrap(), None);
        assert!(matches!(
            parse("@request.body.title = 1").unwrap(),
            Some(Expr::Cmp {
                left: Operand::Body(_),
                ..
            })
        ));
    }

    #[test]
    fn errors_name_the_problem_and_position() {
        for (src, at, needle) in [
            ("a = ", 4, "Expected a field or a value"),
            ("a 1", 2, "operator"),
            ("(a = 1", 6, "')'"),
            ("a = 'x", 4, "Unterminated"),
            ("a = 1 b", 6, "after the end"),
            ("a # 1", 2, "Unexpected character"),
            ("a = @nope", 4, "Unknown variable"),
            ("a = 1 && ", 9, "Expected a field"),
            ("a.b.c.d.e.f.g.h = 1", 0, "at most 6"),
        ] {
            let e = parse(src).unwrap_err();
            assert_eq!(e.at, at, "{src}: {e}");
            assert!(e.message.contains(needle), "{src}: {e}");
        }
        assert!(parse(&"(".repeat(40)).unwrap_err().message.contains("nested"));
        assert!(parse(&"a".repeat(3501)).unwrap_err().message.contains("3500"));
        assert!(parse("a = '\0'").is_err());
    }
}
