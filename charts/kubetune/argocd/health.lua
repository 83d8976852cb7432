-- Argo CD health of a FineTuneJob (kubetune.io/v1alpha1), from the status the operator writes.
-- Install as resource.customizations.health.kubetune.io_FineTuneJob in argocd-cm (docs/operations.md).
-- Pending/Validating/Queued/Running: Progressing with the progress; Succeeded: Healthy;
-- Failed/Cancelled: Degraded with the reason; Suspended: Suspended. With spec.serving, Succeeded
-- is Healthy only once status.serving.ready: Progressing while the serving object comes up,
-- Degraded when the Serving condition is False with ServingFailed or ServingCRDMissing.
-- Lua 5.1 (gopher-lua) syntax.
local hs = {}

-- The condition of type `ctype` that is True (or, with `anyStatus`, in any status).
local function condition(status, ctype, anyStatus)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype and (anyStatus or c.status == "True") then
      return c
    end
  end
  return nil
end

local function explain(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local function progress(p)
  if p == nil then
    return nil
  end
  local parts = {}
  if p.step ~= nil and p.totalSteps ~= nil then
    table.insert(parts, string.format("step %d/%d", p.step, p.totalSteps))
  elseif p.step ~= nil then
    table.insert(parts, string.format("step %d", p.step))
  end
  if p.percent ~= nil then
    table.insert(parts, string.format("%.1f%%", p.percent))
  end
  if p.etaSeconds ~= nil then
    table.insert(parts, string.format("ETA %ds", p.etaSeconds))
  end
  if #parts == 0 then
    return nil
  end
  return table.concat(parts, ", ")
end

local status = obj.status
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
elseif generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = string.format("Waiting for the operator to observe generation %d", generation)
elseif status.phase == "Succeeded" and obj.spec ~= nil and obj.spec.serving ~= nil then
  -- Trained; the job is what the user asked for only once the model is served.
  local serving = status.serving or {}
  local model = serving.model or obj.spec.serving.modelName or (obj.metadata ~= nil and obj.metadata.name) or "the model"
  local c = condition(status, "Serving", true)
  if c ~= nil and c.status == "False" and (c.reason == "ServingFailed" or c.reason == "ServingCRDMissing") then
    hs.status = "Degraded"
    hs.message = "Succeeded; serving " .. model .. " failed: " .. explain(c, nil)
  elseif serving.ready == true then
    hs.status = "Healthy"
    if serving.url ~= nil then
      hs.message = "Succeeded; serving " .. model .. " at " .. serving.url
    else
      hs.message = "Succeeded; serving " .. model
    end
  else
    hs.status = "Progressing"
    local why = serving.message
    if why == nil or why == "" then
      why = explain(c, nil)
    end
    if why == nil then
      hs.message = "Succeeded; serving " .. model .. " not ready"
    else
      hs.message = "Succeeded; serving " .. model .. " not ready: " .. why
    end
  end
elseif status.phase == "Succeeded" then
  hs.status = "Healthy"
  local why = explain(condition(status, "Succeeded"), nil)
  if status.adapter ~= nil and status.adapter.uri ~= nil then
    hs.message = "Succeeded: adapter at " .. status.adapter.uri
  elseif why ~= nil then
    hs.message = "Succeeded: " .. why
  else
    hs.message = "Succeeded"
  end
elseif status.phase == "Failed" or status.phase == "Cancelled" then
  hs.status = "Degraded"
  local why = explain(condition(status, "Failed"), nil)
  if why == nil then
    hs.message = status.phase
  else
    hs.message = status.phase .. ": " .. why
  end
elseif status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = explain(condition(status, "Suspended"), "Suspended")
else
  -- Pending, Validating, Queued, Running and any phase a newer operator adds.
  hs.status = "Progressing"
  local detail = progress(status.progress)
  if detail == nil then
    -- Validating has no condition of its own: DataValidated stays Unknown while the check runs.
    local ctype = status.phase == "Validating" and "DataValidated" or status.phase
    detail = explain(condition(status, ctype, true), nil)
  end
  if detail == nil then
    hs.message = status.phase
  else
    hs.message = status.phase .. ": " .. detail
  end
end
return hs
