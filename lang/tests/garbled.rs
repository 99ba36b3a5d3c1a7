//! Policy text an author garbles (cut at any byte, non-ASCII in every position) gets
//! diagnostics, never a panic: the parser's error hints slice the text they explain.

use mailpolicy_lang::{compile, MemLoader};

const BASE: &str = "list local_domains = domains [\"exämple.com\"];\nserver {\n  hostname \"mx.éxample.com\";\n  local_domains local_domains;\n}\non rcpt {\n  if recipient.domain not in local_domains { reject 554 5.7.1 \"Relay — denied\"; } # ü\n  if sender :is \"ö@x\" { accept; } else { log \"→\"; }\n}\n";

#[test]
fn every_cut_and_insertion_of_non_ascii_compiles_or_explains() {
    let inserts = ["é", "—", "\"", "{", "}", "#", "😀", "else", "if", ";", "\n", "「"];
    let chars: Vec<(usize, char)> = BASE.char_indices().collect();
    for (i, _) in &chars {
        let cut = &BASE[..*i];
        let c = compile("p.mailpolicy", &MemLoader::single("p.mailpolicy", cut));
        let _ = c.diagnostics.iter().map(|d| d.render_short(&c.sources)).count();
        for ins in inserts {
            let text = format!("{}{ins}{}", &BASE[..*i], &BASE[*i..]);
            let c = compile("p.mailpolicy", &MemLoader::single("p.mailpolicy", &text));
            let _ = c.diagnostics.iter().map(|d| d.render_short(&c.sources)).count();
        }
    }
}
