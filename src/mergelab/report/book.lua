-- Pandoc Lua filter for the book without Quarto (see pandoc_book.py, which prepares the notebook).
--
-- Reads a chapter (an executed notebook read with `-f ipynb`, or a .qmd read as Markdown) and does
-- what Quarto's book does with the cell options that pandoc_book.py moved into cell metadata:
--   * the chapter number (metadata `chapter-number`) before the title;
--   * links to other chapters' sources (`claims.qmd`, `01_x.ipynb#sec`) point at their pages;
--   * code cells: the source is hidden for `echo: false`, folded in a <details> block otherwise;
--   * long printed output (more than LONG_OUTPUT lines, e.g. the provenance) folded in a <details> block;
--   * `label: fig-...` + `fig-cap`: the cell's first image becomes a numbered figure with that id,
--     and every `@fig-...` reference becomes a link "Figure N.k" to it (before --citeproc runs,
--     which would take `@fig-...` for a citation);
--   * exercises (cells tagged `exercise`, see mergelab/course.py): a callout `div.callout.callout-exercise`
--     with the id `exercise-<chapter>-<k>`, titled by its `### Exercise <chapter>.<k>: ...` heading; each
--     run of cells tagged `solution` after it folded in `<details class="solution">` ("Solution to
--     exercise 0.1"), its code shown unfolded inside.

local stringify = pandoc.utils.stringify
local LONG_OUTPUT = 25  -- printed output longer than this many lines (the provenance record) is folded

local function caption_inlines(text)
  local doc = pandoc.read(text or "", "markdown-implicit_figures")
  if #doc.blocks == 0 then return pandoc.Inlines({}) end
  return pandoc.Inlines(doc.blocks[1].content or {})
end

local function first_image(blocks)
  local found = nil
  pandoc.Blocks(blocks):walk({
    Image = function(img)
      if not found then found = img end
    end,
  })
  return found
end

local function number_of(chapter, k)
  if chapter ~= "" then return chapter .. "." .. k end
  return tostring(k)
end

local function fold(code)
  return {
    pandoc.RawBlock("html", '<details class="code-fold"><summary>Code</summary>'),
    code,
    pandoc.RawBlock("html", "</details>"),
  }
end

-- A code cell: hide or fold its source; turn a labelled figure's image into a numbered figure.
local function code_cell(div, chapter, figures, count, fold_code)
  local label = div.attributes["label"] or ""
  local cap = div.attributes["fig-cap"]
  local echo = div.attributes["echo"] ~= "false"
  local content = pandoc.Blocks({})
  for _, block in ipairs(div.content) do
    if block.t == "CodeBlock" and block.classes:includes("python") then
      if echo and block.text:match("%S") then
        if fold_code then content:extend(fold(block)) else content:insert(block) end
      end
    elseif block.t == "Div" and block.classes:includes("stream") and #block.content == 1
        and block.content[1].t == "CodeBlock" and select(2, block.content[1].text:gsub("\n", "")) > LONG_OUTPUT then
      local lines = select(2, block.content[1].text:gsub("\n", ""))
      content:extend({ pandoc.RawBlock("html", '<details class="long-output"><summary>Printed output (' .. lines
                       .. " lines)</summary>"), block, pandoc.RawBlock("html", "</details>") })
    elseif block.t == "Div" and label:match("^fig%-") and figures[label] == nil and first_image(block.content) then
      count = count + 1
      local number = number_of(chapter, count)
      figures[label] = number
      local img = first_image(block.content)
      local text = caption_inlines(cap)
      img.caption = pandoc.Inlines({ pandoc.Str(stringify(text)) })
      local caption = pandoc.Inlines({ pandoc.Span({ pandoc.Str("Figure " .. number .. ":") }, { class = "figure-number" }),
                                       pandoc.Space() })
      caption:extend(text)
      content:insert(pandoc.Figure({ pandoc.Plain({ img }) }, { pandoc.Plain(caption) }, pandoc.Attr(label)))
    else
      content:insert(block)
    end
  end
  for _, key in ipairs({ "label", "fig-cap", "echo", "tags" }) do div.attributes[key] = nil end
  div.content = content
  return div, count
end

local function tags_of(div)
  local found = {}
  for tag in (div.attributes["tags"] or ""):gmatch('"([^"]+)"') do found[tag] = true end
  return found
end

-- An exercise statement: a callout titled by its heading, with an id made of its number.
local function exercise_callout(div)
  local number = stringify(div.content):match("^Exercise (%d+%.%d+):") or ""
  div.attributes["tags"] = nil
  local id = number ~= "" and ("exercise-" .. number:gsub("%.", "-")) or ""
  return pandoc.Div(div.content, pandoc.Attr(id, { "callout", "callout-exercise" }, { role = "note" })), number
end

function Pandoc(doc)
  local chapter = doc.meta["chapter-number"] and stringify(doc.meta["chapter-number"]) or ""
  local figures, count, titled = {}, 0, false
  if chapter ~= "" and doc.meta.title then
    doc.meta.title = pandoc.Inlines({ pandoc.Span({ pandoc.Str(chapter) }, { class = "chapter-number" }), pandoc.Space() })
      .. pandoc.Inlines(doc.meta.title)
    titled = true
  end
  local blocks = pandoc.Blocks({})
  local solution, exercise = nil, "?"
  local function flush()  -- the pending run of solution cells, folded
    if solution == nil then return end
    blocks:insert(pandoc.RawBlock("html", '<details class="solution"><summary>Solution to exercise ' .. exercise
                                  .. "</summary>"))
    blocks:extend(solution)
    blocks:insert(pandoc.RawBlock("html", "</details>"))
    solution = nil
  end
  for _, block in ipairs(doc.blocks) do
    local tags = (block.t == "Div" and block.classes:includes("cell")) and tags_of(block) or {}
    if block.t == "Div" and block.classes:includes("cell") and block.classes:includes("code") then
      block, count = code_cell(block, chapter, figures, count, not tags["solution"])
    end
    if tags["solution"] then
      if block.attributes then block.attributes["tags"] = nil end
      solution = solution or pandoc.Blocks({})
      solution:insert(block)
    else
      flush()
      if tags["exercise"] then
        local number
        block, number = exercise_callout(block)
        if number ~= "" then exercise = number end
      elseif tags["exercise-check"] and block.attributes then
        block.attributes["tags"] = nil
        block.classes:insert("exercise-check")
      end
      blocks:insert(block)
    end
  end
  flush()
  blocks = blocks:walk({
    Header = function(h)
      if chapter ~= "" and not titled and h.level == 1 and not h.classes:includes("unnumbered") then
        titled = true
        h.content = pandoc.Inlines({ pandoc.Span({ pandoc.Str(chapter) }, { class = "chapter-number" }), pandoc.Space() })
          .. h.content
      end
      return h
    end,
    Link = function(link)  -- links between chapters name their sources, as Quarto allows
      if not link.target:match("^%a[%w+.-]*:") then
        link.target = link.target:gsub("^([^#]-)%.qmd(#?)", "%1.html%2"):gsub("^([^#]-)%.ipynb(#?)", "%1.html%2")
      end
      return link
    end,
    Cite = function(cite)
      local id = cite.citations[1].id
      if not id:match("^fig%-") then return nil end
      local number = figures[id]
      if number == nil then
        io.stderr:write("[WARNING] no figure labelled " .. id .. " in this chapter\n")
        return pandoc.Strong({ pandoc.Str("?" .. id) })
      end
      return pandoc.Link({ pandoc.Str("Figure"), pandoc.Space(), pandoc.Str(number) }, "#" .. id, "", { class = "fig-ref" })
    end,
  })
  doc.blocks = blocks
  return doc
end
