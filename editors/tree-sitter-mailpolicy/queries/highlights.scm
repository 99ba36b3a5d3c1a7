; Highlighting for mailpolicy (nvim-treesitter / Helix capture names).
(comment) @comment
(string) @string
[(number) (size) (duration) (enhanced_code)] @number
(tag) @attribute
(operator) @operator
(null_check) @operator
["require" "include" "list" "table" "secret" "scanner" "mailing_list" "server" "listener" "rules" "on" "route"] @keyword
["if" "elsif" "else"] @keyword.conditional
["and" "or" "not" "allof" "anyof" "in" "is" "null"] @keyword.operator
["domains" "cidr" "strings"] @type.builtin
["{" "}" "(" ")" "[" "]"] @punctuation.bracket
["," ";"] @punctuation.delimiter
"=" @operator
(list_declaration name: (identifier) @constant)
(resource_declaration name: (identifier) @constant)
(resource_declaration kind: (identifier) @type)
(rules_declaration name: (identifier) @function)
(stage_block stage: (identifier) @label)
(settings name: (identifier) @constant)
(option name: (identifier) @property)
(action name: (identifier) @function.builtin)
(term name: (identifier) @variable.builtin)
